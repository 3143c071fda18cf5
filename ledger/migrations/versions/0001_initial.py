"""Initial ledger schema: peers, sessions, receipts, hash chain heads, credit, prices.

Revision ID: 0001_initial
Revises:
Create Date: 2025-11-22
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None

# The SpecEdge paper's cost table (NeurIPS 2025): an A100 80 GB server and an RTX 4090 edge.
DEFAULT_PRICES = (
    ("server", "NVIDIA A100 80GB", 5.05),
    ("edge", "NVIDIA RTX 4090", 0.35),
)


def upgrade() -> None:
    op.create_table(
        "peers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("peer_id", sa.String(length=128), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_peers"),
        sa.UniqueConstraint("peer_id", name="uq_peers_peer_id"),
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("verifier_pk", sa.Integer(), nullable=False),
        sa.Column("node_pk", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.LargeBinary(), nullable=False),
        sa.Column("model_id", sa.String(length=256), nullable=False),
        sa.ForeignKeyConstraint(
            ["verifier_pk"], ["peers.id"], name="fk_sessions_verifier_pk_peers"
        ),
        sa.ForeignKeyConstraint(["node_pk"], ["peers.id"], name="fk_sessions_node_pk_peers"),
        sa.PrimaryKeyConstraint("id", name="pk_sessions"),
        sa.UniqueConstraint("verifier_pk", "session_id", name="uq_sessions_verifier_pk_session_id"),
    )
    op.create_index("ix_sessions_node_pk", "sessions", ["node_pk"])
    op.create_table(
        "receipts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("verifier_pk", sa.Integer(), nullable=False),
        sa.Column("node_pk", sa.Integer(), nullable=False),
        sa.Column("session_pk", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("request_sha256", sa.LargeBinary(), nullable=False),
        sa.Column("drafted", sa.Integer(), nullable=False),
        sa.Column("accepted", sa.Integer(), nullable=False),
        sa.Column("verify_micros", sa.BigInteger(), nullable=False),
        sa.Column("draft_micros", sa.BigInteger(), nullable=False),
        sa.Column("unix_ms", sa.BigInteger(), nullable=False),
        sa.Column("model_id", sa.String(length=256), nullable=False),
        sa.Column("receipt_envelope", sa.LargeBinary(), nullable=False),
        sa.Column("request_envelope", sa.LargeBinary(), nullable=False),
        sa.Column("chain_index", sa.BigInteger(), nullable=False),
        sa.Column("ingested_ms", sa.BigInteger(), nullable=False),
        sa.Column("prev_hash", sa.LargeBinary(), nullable=False),
        sa.Column("row_hash", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["verifier_pk"], ["peers.id"], name="fk_receipts_verifier_pk_peers"
        ),
        sa.ForeignKeyConstraint(["node_pk"], ["peers.id"], name="fk_receipts_node_pk_peers"),
        sa.ForeignKeyConstraint(
            ["session_pk"], ["sessions.id"], name="fk_receipts_session_pk_sessions"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_receipts"),
        sa.UniqueConstraint("session_pk", "seq", name="uq_receipts_session_pk_seq"),
        sa.UniqueConstraint(
            "verifier_pk", "chain_index", name="uq_receipts_verifier_pk_chain_index"
        ),
    )
    op.create_index("ix_receipts_node_pk", "receipts", ["node_pk"])
    op.create_index("ix_receipts_unix_ms", "receipts", ["unix_ms"])
    op.create_table(
        "chain_heads",
        sa.Column("verifier_pk", sa.Integer(), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["verifier_pk"], ["peers.id"], name="fk_chain_heads_verifier_pk_peers"
        ),
        sa.PrimaryKeyConstraint("verifier_pk", name="pk_chain_heads"),
    )
    op.create_table(
        "credit_entries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("receipt_pk", sa.Integer(), nullable=False),
        sa.Column("account", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["receipt_pk"], ["receipts.id"], name="fk_credit_entries_receipt_pk_receipts"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_credit_entries"),
    )
    op.create_index("ix_credit_entries_account", "credit_entries", ["account"])
    op.create_index("ix_credit_entries_receipt_pk", "credit_entries", ["receipt_pk"])
    prices = op.create_table(
        "prices",
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("hardware", sa.String(length=128), nullable=False),
        sa.Column("usd_per_hour", sa.Float(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("kind", name="pk_prices"),
    )
    op.create_table(
        "baselines",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("mode", sa.String(length=32), nullable=False),
        sa.Column("label", sa.String(length=256), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("server_seconds", sa.Float(), nullable=False),
        sa.Column("edge_seconds", sa.Float(), nullable=False),
        sa.Column("recorded_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_baselines"),
    )
    now = int(time.time() * 1000)
    op.bulk_insert(
        prices,
        [
            {"kind": kind, "hardware": hw, "usd_per_hour": usd, "updated_ms": now}
            for kind, hw, usd in DEFAULT_PRICES
        ],
    )


def downgrade() -> None:
    for table in ("baselines", "prices", "credit_entries", "chain_heads", "receipts"):
        op.drop_table(table)
    op.drop_table("sessions")
    op.drop_table("peers")
