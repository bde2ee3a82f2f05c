"""The migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from store.db import migrate, session_factory
from store.models import Base
from tests.api.conftest import settings  # noqa: F401 - the SQLite / PostgreSQL fixture


def test_migrated_schema_matches_the_models(settings):  # noqa: F811
    migrate(settings)
    engine = session_factory(settings).kw["bind"]
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    # Type spellings differ harmlessly between dialects; what matters is tables, columns, indexes.
    structural = [d for d in diff if d[0] in ("add_table", "remove_table", "add_column",
                                              "remove_column", "add_index", "remove_index")]
    assert structural == []


def test_no_plain_index_is_the_prefix_of_another(settings):  # noqa: F811
    """An index on (a) beside one on (a, b) serves no lookup the second does not, and every
    insert writes both: job creations paid for two such (migration 0005). Unique and partial
    indexes are exempt: they say something the longer one does not."""
    from sqlalchemy import inspect

    migrate(settings)
    inspector = inspect(session_factory(settings).kw["bind"])
    redundant = []
    for table in inspector.get_table_names():
        indexes = inspector.get_indexes(table)
        keys = [tuple(i["column_names"]) for i in indexes]
        keys += [tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)]
        keys.append(tuple(inspector.get_pk_constraint(table)["constrained_columns"]))
        for index in indexes:
            own = tuple(index["column_names"])
            partial = any(k.endswith("_where") and v is not None
                          for k, v in index.get("dialect_options", {}).items())
            if index["unique"] or partial:
                continue
            if any(k != own and k[:len(own)] == own for k in keys):
                redundant.append((table, index["name"]))
    assert redundant == []


def test_downgrade_and_upgrade_keep_every_row(settings):  # noqa: F811
    """On SQLite a batch migration rebuilds a table by copying it, dropping it and renaming the
    copy; with foreign keys on, the drop deleted the jobs' rows first, and the cascade emptied
    job_events and checkpoints (0003's downgrade)."""
    from alembic import command

    from store.db import alembic_config, session_scope
    from store.models import Checkpoint, Job, JobEvent, Tenant

    migrate(settings)
    with session_scope(settings) as s:
        tenant = Tenant(name="t")
        s.add(tenant)
        s.flush()
        job = Job(tenant_id=tenant.id, model="m", training_file="f", status="succeeded",
                  spec={"method": {"type": "supervised"}})
        s.add(job)
        s.flush()
        s.add(JobEvent(tenant_id=tenant.id, job_id=job.id, message="m"))
        s.add(Checkpoint(tenant_id=tenant.id, job_id=job.id, step_number=1, storage_path="x"))
    session_factory(settings).kw["bind"].dispose()
    config = alembic_config(settings.sqlalchemy_url)
    command.downgrade(config, "0002")
    command.upgrade(config, "head")
    with session_scope(settings) as s:
        counts = [s.query(m).count() for m in (Job, JobEvent, Checkpoint)]
    assert counts == [1, 1, 1]


def _migrate(data_dir: str) -> str:
    from store.settings import Settings

    migrate(Settings(data_dir=data_dir, secret_key="x"))
    return "ok"


def test_processes_migrating_a_fresh_database_at_once_all_succeed(tmp_path):
    """`driftsafe up &` then `driftsafe tenants create` (the README's first run) both migrate a
    fresh SQLite database; the second saw no version recorded yet, ran the first revision again
    and died on 'table tenants already exists'."""
    from tests.at_once import in_processes_at_once

    for attempt in range(3):
        results = in_processes_at_once(_migrate, (str(tmp_path / f"fresh{attempt}"),), 4)
        assert results == ["ok"] * 4, results
