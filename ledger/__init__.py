"""SpecEdge ledger: signed receipts, per-verifier hash chains, double-entry credit, cost.

The verifier daemon (and a node keeping its own receipts) use:

    ledger = open_ledger(url)            # None: SQLite file in the user's data dir
    ledger.ingest(receipt_env, request_env) -> IngestResult
    # or, to survive database outages:
    ledger = SpoolingLedger(url, spool_dir)
"""

from specedge.ledger.accounting import NETWORK_ACCOUNT, Prices
from specedge.ledger.checks import CheckedReceipt, LedgerError, ReceiptRejected, check_pair
from specedge.ledger.core import (
    DUPLICATE,
    REJECTED,
    SPOOLED,
    STORED,
    Balance,
    ChainHeadInfo,
    IngestResult,
    Ledger,
    LedgerUnavailable,
    open_ledger,
)
from specedge.ledger.db import default_ledger_path
from specedge.ledger.spool import SpoolingLedger
from specedge.ledger.verify import Problem, VerifyReport

__all__ = [
    "DUPLICATE",
    "NETWORK_ACCOUNT",
    "REJECTED",
    "SPOOLED",
    "STORED",
    "Balance",
    "ChainHeadInfo",
    "CheckedReceipt",
    "IngestResult",
    "Ledger",
    "LedgerError",
    "LedgerUnavailable",
    "Prices",
    "Problem",
    "ReceiptRejected",
    "SpoolingLedger",
    "VerifyReport",
    "check_pair",
    "default_ledger_path",
    "open_ledger",
]
