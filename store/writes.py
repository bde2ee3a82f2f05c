"""Rows of several tables written together, atomically, in as few round trips as the database
allows.

A job's creation writes three rows: the job, its first event and its idempotency record. On
PostgreSQL they go as ONE statement (data-modifying CTEs): a single statement is atomic by itself,
so the request runs in autocommit, with no BEGIN and COMMIT round trips and no ORM unit of work.
Measured on 2 cores against the same database: about 1.7-2.5 ms per creation's writes and its
read, against 4.3-8 ms through ORM objects and a transaction. SQLite has no data-modifying CTEs;
there the rows are inserted one by one inside the caller's transaction.

A row is (model, values): every column the table needs is given, since a Python-side column
default is applied to the top-level statement only, never inside a CTE.
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

from sqlalchemy import bindparam, insert
from sqlalchemy.orm import Session

Row = tuple[type, dict]

AUTOCOMMIT = {"isolation_level": "AUTOCOMMIT"}


def one_statement(session: Session) -> bool:
    """Can this session's database write several tables' rows in one atomic statement?"""
    return session.get_bind().dialect.name == "postgresql"


def begin_autocommit(session: Session) -> None:
    """From here on, each of the session's statements stands alone: no BEGIN, no COMMIT. Call it
    before the session's first statement, and only where `one_statement` holds (the writes are
    then one statement, atomic by itself)."""
    session.connection(execution_options=AUTOCOMMIT)


def _key(model: type, column: str) -> str:
    return f"{model.__tablename__}__{column}"


@lru_cache(maxsize=64)
def _together(shape: tuple[tuple[type, tuple[str, ...]], ...]):
    """One INSERT per table, all but the last as CTEs of the last, with bound parameters: built
    once per shape (building a statement costs as much as running it)."""
    statements = [insert(model).values({c: bindparam(_key(model, c), type_=getattr(model, c).type)
                                        for c in columns})
                  for model, columns in shape]
    ctes = [s.cte(f"w{i}") for i, s in enumerate(statements[:-1])]
    return statements[-1].add_cte(*ctes) if ctes else statements[-1]


def insert_together(session: Session, rows: list[Row]) -> None:
    """Insert `rows` (one per table, parents first) atomically: as one statement where the
    database allows it, else one statement each in the session's transaction."""
    if not one_statement(session):
        for model, values in rows:
            session.execute(insert(model).values(values))
        return
    shape = tuple((model, tuple(sorted(values))) for model, values in rows)
    params = {_key(model, c): v for model, values in rows for c, v in values.items()}
    session.connection().execute(_together(shape), params)


@lru_cache(maxsize=16)
def _columns(model: type) -> tuple[str, ...]:
    return tuple(attr.key for attr in model.__mapper__.column_attrs)


def as_written(model: type, values: dict) -> SimpleNamespace:
    """What a plain row of `model` reads as once written: every column attribute, from `values`
    or None, on a plain object. For shaping a response from a row staged with `Row`; an ORM
    instance built only for that cost more than the creation's read (~50 us)."""
    return SimpleNamespace(**(dict.fromkeys(_columns(model)) | values))
