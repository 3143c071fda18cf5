"""Alembic environment for the ledger.

The ledger runs migrations itself (`specedge.ledger.db.migrate`) on a connection it has
already opened and locked, so this file only configures that connection. There is no
alembic.ini: the Config is built in code.
"""

from __future__ import annotations

from alembic import context

from specedge.ledger.schema import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reachable from the alembic command line
    raise RuntimeError("run ledger migrations through specedge.ledger.db.migrate()")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things in place; batch mode rebuilds tables instead.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
