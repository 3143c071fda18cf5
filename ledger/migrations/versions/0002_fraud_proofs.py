"""Fraud proofs and clean audit records (issue 15: audited verification).

Revision ID: 0002_fraud_proofs
Revises: 0001_initial
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_fraud_proofs"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fraud_proofs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("proof_sha256", sa.String(length=64), nullable=False),
        sa.Column("accused", sa.String(length=128), nullable=False),
        sa.Column("node", sa.String(length=128), nullable=False),
        sa.Column("model_id", sa.String(length=256), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("auditors", sa.String(length=1024), nullable=False),
        sa.Column("proof", sa.LargeBinary(), nullable=False),
        sa.Column("stored_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_fraud_proofs"),
        sa.UniqueConstraint("proof_sha256", name="uq_fraud_proofs_proof_sha256"),
    )
    op.create_index("ix_fraud_proofs_accused", "fraud_proofs", ["accused"])
    op.create_table(
        "audit_records",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("verifier", sa.String(length=128), nullable=False),
        sa.Column("auditor", sa.String(length=128), nullable=False),
        sa.Column("session_id", sa.LargeBinary(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("near_ties", sa.Integer(), nullable=False),
        sa.Column("recorded_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_records"),
    )
    op.create_index("ix_audit_records_verifier", "audit_records", ["verifier"])


def downgrade() -> None:
    op.drop_index("ix_audit_records_verifier", table_name="audit_records")
    op.drop_table("audit_records")
    op.drop_index("ix_fraud_proofs_accused", table_name="fraud_proofs")
    op.drop_table("fraud_proofs")
