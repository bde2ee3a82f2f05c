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
