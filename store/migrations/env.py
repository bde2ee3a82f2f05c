"""Alembic environment: the URL comes from the caller (store.db.migrate), models from store."""

from alembic import context
from sqlalchemy import event

from store.db import make_engine
from store.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"),
                      target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    engine = make_engine(url)
    if url.startswith("sqlite"):
        # A batch migration rebuilds a table (copy, DROP, rename). With foreign keys on, SQLite's
        # DROP TABLE first deletes the table's rows, cascading to their children: 0003's
        # downgrade emptied job_events and checkpoints. Keys off while migrating (after
        # store.db's pragmas, which turn them on), as alembic's batch mode advises.
        event.listen(engine, "connect",
                     lambda conn, _record: conn.execute("PRAGMA foreign_keys=OFF"))
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=url.startswith("sqlite"))
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
