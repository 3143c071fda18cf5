"""A ledger that keeps working while its database is down.

`SpoolingLedger.ingest` checks the receipt (signatures need no database), then stores
it, or, when the database cannot be reached, writes it to a spool directory: one file
per receipt, written to a temporary name, fsync'd, renamed into place and the directory
fsync'd, so a receipt reported "spooled" survives a crash or power cut. `flush()`
(called by ingest once the database answers again, or by a background thread) stores
spooled receipts in order and deletes each file only after its transaction committed.

Nothing doubled: a crash between the commit and the unlink leaves the file, and storing
it again is a no-op because ingest is idempotent on (verifier, session, seq) with the
same bytes ("duplicate"). Nothing lost: a file is removed only after "stored" or
"duplicate"; a file the ledger refuses is moved to `rejected/` with the reason.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from specedge.ledger.checks import ReceiptRejected, check_pair
from specedge.ledger.core import (
    DUPLICATE,
    REJECTED,
    SPOOLED,
    STORED,
    IngestResult,
    Ledger,
    LedgerUnavailable,
    open_ledger,
)

log = logging.getLogger("specedge.ledger.spool")

_MAGIC = b"SPECEDGE-SPOOL-1"
_LEN = struct.Struct(">I")
_SUFFIX = ".rcpt"
_FLUSH_BATCH = 256


@dataclass(frozen=True)
class FlushResult:
    stored: int = 0
    duplicate: int = 0
    rejected: int = 0
    remaining: int = 0
    database_up: bool = True


def _encode(receipt_env: bytes, request_env: bytes) -> bytes:
    body = (
        _MAGIC
        + _LEN.pack(len(receipt_env))
        + receipt_env
        + _LEN.pack(len(request_env))
        + request_env
    )
    return body + hashlib.sha256(body).digest()


def _decode(data: bytes) -> tuple[bytes, bytes]:
    body, digest = data[:-32], data[-32:]
    if not body.startswith(_MAGIC) or hashlib.sha256(body).digest() != digest:
        raise ValueError("spool file is corrupt")
    pos = len(_MAGIC)
    (n,) = _LEN.unpack_from(body, pos)
    receipt_env = body[pos + 4 : pos + 4 + n]
    pos += 4 + n
    (m,) = _LEN.unpack_from(body, pos)
    request_env = body[pos + 4 : pos + 4 + m]
    if pos + 4 + m != len(body):
        raise ValueError("spool file is corrupt")
    return receipt_env, request_env


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolingLedger:
    """`open_ledger(url)` with a durable local spool for database outages.

    Same `ingest` contract as Ledger, plus status "spooled". Thread-safe: ingest may be
    called from several threads; one flush runs at a time.

    url: as for open_ledger. spool_dir: a local directory (created). retry_interval:
    after a failure, seconds during which ingest spools at once instead of waiting
    on the database again (a connect attempt can take the connect timeout).
    """

    def __init__(
        self,
        url: str | None,
        spool_dir: str | os.PathLike[str],
        *,
        retry_interval: float = 5.0,
        name: str = "ledger",
    ) -> None:
        self._url = url
        self._name = name
        self.spool_dir = Path(spool_dir)
        self.rejected_dir = self.spool_dir / "rejected"
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        self.retry_interval = retry_interval
        self._ledger: Ledger | None = None
        self._open_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._next_try = 0.0
        self._counter = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Temporary files are receipts whose ingest never returned: not acknowledged.
        for tmp in self.spool_dir.glob(".tmp-*"):
            tmp.unlink(missing_ok=True)
        self._connect()

    # ------------------------------------------------------------ database state

    @property
    def ledger(self) -> Ledger | None:
        """The open Ledger, or None while the database has not been reached."""
        return self._ledger

    def _connect(self) -> Ledger | None:
        """The ledger if the database may be up; None while in the back-off window."""
        if time.monotonic() < self._next_try:
            return None
        if self._ledger is not None:
            return self._ledger
        with self._open_lock:
            if self._ledger is None:
                try:
                    self._ledger = open_ledger(self._url, name=self._name)
                except LedgerUnavailable:
                    self._down()
        return self._ledger

    def _down(self) -> None:
        self._next_try = time.monotonic() + self.retry_interval

    def earned_buckets(self, account: str) -> list[tuple[int, int]]:
        """The account's credit by hour (see Ledger.earned_buckets); LedgerUnavailable
        while the database is down (receipts still spooled are not counted yet)."""
        ledger = self._connect()
        if ledger is None:
            raise LedgerUnavailable("the ledger database is unreachable")
        return ledger.earned_buckets(account)

    # ------------------------------------------------------------ ingest

    def ingest(self, receipt_envelope: bytes, request_envelope: bytes) -> IngestResult:
        """Store, or spool when the database is unreachable. Raises ReceiptRejected."""
        checked = check_pair(receipt_envelope, request_envelope)
        ledger = self._connect()
        if ledger is not None and self.pending() and not self.flush().database_up:
            ledger = None
        if ledger is not None and not self.pending():
            try:
                result = ledger.store_one(checked)
            except LedgerUnavailable:
                self._down()
            except Exception:
                # Anything else (a bug, a full disk) must not lose a checked receipt either:
                # keep it on disk; flush retries it and surfaces the error there.
                log.exception("ledger write failed; receipt spooled")
                self._down()
            else:
                if result.error is not None:
                    raise result.error
                return result
        self._write(checked.receipt_envelope, checked.request_envelope)
        return IngestResult.of(checked, SPOOLED)

    def _write(self, receipt_env: bytes, request_env: bytes) -> Path:
        tag = hashlib.sha256(receipt_env).hexdigest()[:16]
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._counter):08d}-{tag}{_SUFFIX}"
        final = self.spool_dir / name
        tmp = self.spool_dir / f".tmp-{name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            data = memoryview(_encode(receipt_env, request_env))
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(self.spool_dir)  # the rename itself must survive a power cut
        return final

    def pending(self) -> int:
        """Receipts waiting in the spool."""
        return sum(1 for _ in self.spool_dir.glob("*" + _SUFFIX))

    def flush(self) -> FlushResult:
        """Store spooled receipts, oldest first. Stops (files kept) if the database fails."""
        with self._flush_lock:
            files = sorted(self.spool_dir.glob("*" + _SUFFIX))
            stored = duplicate = rejected = 0
            if not files:
                return FlushResult()
            ledger = self._connect()
            if ledger is None:
                return FlushResult(remaining=len(files), database_up=False)
            for i in range(0, len(files), _FLUSH_BATCH):
                batch = files[i : i + _FLUSH_BATCH]
                pairs: list[tuple[bytes, bytes]] = []
                kept: list[Path] = []
                for path in batch:
                    try:
                        pairs.append(_decode(path.read_bytes()))
                        kept.append(path)
                    except FileNotFoundError:
                        continue  # another process (`specedge-ledger flush`) took it
                    except ValueError as exc:
                        self._reject(path, str(exc))
                        rejected += 1
                try:
                    results = ledger.ingest_many(pairs)
                except LedgerUnavailable:
                    self._down()
                    return FlushResult(
                        stored, duplicate, rejected, len(files) - i, database_up=False
                    )
                for path, res in zip(kept, results, strict=True):
                    if res.status == REJECTED:
                        self._reject(path, str(res.error))
                        rejected += 1
                        continue
                    stored += res.status == STORED
                    duplicate += res.status == DUPLICATE
                    path.unlink(missing_ok=True)
                _fsync_dir(self.spool_dir)
            return FlushResult(stored, duplicate, rejected, self.pending())

    def _reject(self, path: Path, reason: str) -> None:
        # Kept for a human to look at, out of the way of later flushes.
        try:
            os.replace(path, self.rejected_dir / path.name)
        except FileNotFoundError:
            return
        (self.rejected_dir / (path.name + ".reason")).write_text(reason + "\n")

    # ------------------------------------------------------------ background flushing

    def start_background_flush(self, interval: float = 5.0) -> None:
        """Flush from a daemon thread every `interval` seconds while receipts wait."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                if self.pending():
                    try:
                        self.flush()
                    except Exception:  # keep flushing later; the files are still there
                        log.exception("spool flush failed")
                        self._down()

        self._thread = threading.Thread(target=loop, name="ledger-spool-flush", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._ledger is not None:
            self._ledger.close()

    def __enter__(self) -> SpoolingLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["FlushResult", "ReceiptRejected", "SpoolingLedger"]
