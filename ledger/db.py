"""Engines and migrations: one code path for an SQLite file and for PostgreSQL."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url

ENV_VAR = "SPECEDGE_LEDGER"
# Any fixed 64-bit number: serialises concurrent `migrate()` calls on one PostgreSQL database.
_MIGRATION_LOCK_KEY = 0x5EED_1ED6_E700_0001 - (1 << 63)
# Execution option that makes a SQLite transaction take the write lock up front.
WRITE = "ledger_write"


def default_ledger_path(name: str = "ledger") -> Path:
    """Where the ledger lives when no URL is given: the user's data dir for `specedge`.

    A verifier uses the default name; a node keeping its own receipts can pass e.g. "node".
    """
    import platformdirs

    return platformdirs.user_data_path("specedge") / f"{name}.sqlite3"


def resolve_url(url: str | os.PathLike[str] | None, name: str = "ledger") -> str:
    """Turn what a user typed into an SQLAlchemy URL.

    None means $SPECEDGE_LEDGER (for the default name only: it names the verifier's
    ledger, and a node's own receipts must not land there), else the default SQLite file;
    a bare path means an SQLite file; `postgresql://` gets the psycopg 3 driver.
    """
    if url is None and name == "ledger":
        url = os.environ.get(ENV_VAR) or None
    if url is None:
        path = default_ledger_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    url = os.fspath(url)
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().absolute()}"
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str) -> Engine:
    """An engine with the settings the ledger relies on (see the comments per backend)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    if parsed.get_backend_name() == "postgresql":
        connect_args = {} if "connect_timeout" in parsed.query else {"connect_timeout": 5}
        # pre_ping: after an outage, stale pooled connections are replaced instead of failing
        # the first ingest that picks one up.
        return create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    raise ValueError(f"unsupported ledger database {parsed.get_backend_name()!r}")


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        # Take transaction control away from the sqlite3 module so BEGIN is ours (below).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        # WAL: readers (the CLI, verify) never block the verifier's writes.
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a receipt the ledger said it stored survives a power cut.
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        # Other processes on the same file wait instead of failing at once.
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # A deferred transaction that reads then writes can fail with "database is locked"
        # without waiting; writers take the lock first so busy_timeout applies.
        if conn.get_execution_options().get(WRITE):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

    return engine


def alembic_config(connection: Connection | None = None):  # type: ignore[no-untyped-def]
    """An Alembic Config built in code: no alembic.ini is needed at run time."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision`; safe when several processes start at once."""
    from alembic import command

    with engine.connect() as conn:
        conn = conn.execution_options(**{WRITE: True})
        with conn.begin():
            if conn.dialect.name == "postgresql":
                # Two verifiers starting together must not both create the tables.
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
            command.upgrade(alembic_config(conn), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
