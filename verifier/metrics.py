"""Prometheus metrics of a verifier, in their own registry.

Names follow vLLM's speculative-decoding counters where they fit
(`..._spec_decode_num_drafts`, `..._num_draft_tokens`, `..._num_accepted_tokens`,
`..._num_accepted_tokens_per_pos`), so dashboards built for vLLM read them the same way.
Served as Prometheus text on 127.0.0.1 only: the figures are for the operator, not for
the peer-to-peer network (peers get the Advertisement).
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from specedge.kvblocks import BlockStore

_SIZE_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 48, 64, 128)
_TOKEN_BUCKETS = (1, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
MAX_POSITIONS = 32  # accepted-per-position labels kept up to this depth


class VerifierMetrics:
    """Every figure the daemon exports; one instance per process."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "specedge_"
        self.sessions_open = Gauge(p + "sessions_open", "Sessions holding a KV cache",
                                   registry=r)
        self.sessions_opened = Counter(p + "sessions_opened", "Sessions opened", registry=r)
        self.audits_served = Counter(p + "audits_served", "Transcripts replayed for audits",
                                     registry=r)
        self.audit_seconds = Counter(p + "audit_seconds", "Engine seconds spent on audits",
                                     registry=r)
        self.audit_tokens = Counter(p + "audit_tokens", "Committed tokens replayed in audits",
                                    registry=r)
        self.sessions_closed = Counter(p + "sessions_closed", "Sessions ended, by reason",
                                       ["reason"], registry=r)
        self.kv_cache_bytes = Gauge(p + "kv_cache_bytes", "Bytes held by session KV caches",
                                    registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "Jobs waiting for the engine", registry=r)
        self.num_drafts = Counter(p + "spec_decode_num_drafts", "Verify requests answered",
                                  registry=r)
        self.num_draft_tokens = Counter(p + "spec_decode_num_draft_tokens",
                                        "Draft tokens verified", registry=r)
        self.num_accepted_tokens = Counter(p + "spec_decode_num_accepted_tokens",
                                           "Draft tokens accepted (bonus tokens not counted)",
                                           registry=r)
        self.num_accepted_per_pos = Counter(
            p + "spec_decode_num_accepted_tokens_per_pos",
            "Requests whose accepted path reached this depth (0 = first draft token)",
            ["position"], registry=r)
        self.committed_tokens = Counter(p + "committed_tokens",
                                        "Tokens committed to sessions (accepted + bonus)",
                                        registry=r)
        self.plain_steps = Counter(p + "plain_steps", "Requests with an empty tree: one "
                                   "target step (e.g. a session's first token)", registry=r)
        self.prefill_tokens = Counter(p + "prefill_tokens", "Prompt tokens prefilled",
                                      registry=r)
        self.batch_size = Histogram(p + "batch_size", "Verify requests per forward pass",
                                    buckets=_SIZE_BUCKETS, registry=r)
        self.batch_jobs = Histogram(p + "batch_jobs",
                                    "Sessions per forward pass (verify and prefill)",
                                    buckets=_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram(p + "batch_tokens", "Rows forwarded per pass",
                                      buckets=_TOKEN_BUCKETS, registry=r)
        self.pass_seconds = Histogram(p + "pass_seconds", "Wall time of one forward pass",
                                      buckets=_SECONDS_BUCKETS, registry=r)
        self.gather_seconds = Counter(p + "gather_seconds",
                                      "Time the engine was held for due requests to join "
                                      "a pass", registry=r)
        self.busy_seconds = Counter(p + "engine_busy_seconds", "Time the engine spent in passes",
                                    registry=r)
        self.verify_latency = Histogram(p + "verify_latency_seconds",
                                        "Verify request received to result sent",
                                        buckets=_SECONDS_BUCKETS, registry=r)
        self.errors = Counter(p + "errors", "Error frames sent, by code", ["code"], registry=r)
        # KV blocks: vLLM's prefix-cache names (counted in tokens), then ours.
        self.prefix_queries = Counter(p + "prefix_cache_queries", "Prompt tokens looked up "
                                      "in the prefix cache (full blocks)", registry=r)
        self.prefix_hits = Counter(p + "prefix_cache_hits", "Prompt tokens found in the "
                                   "prefix cache", registry=r)
        self.kv_blocks = Gauge(p + "kv_blocks", "KV blocks held, by tier", ["tier"],
                               registry=r)
        self.kv_bytes = Gauge(p + "kv_bytes", "Bytes of KV blocks, by tier", ["tier"],
                              registry=r)
        self.kv_session_bytes = Gauge(p + "kv_session_bytes", "KV memory live sessions hold "
                                      "(shared blocks counted once)", registry=r)
        self.kv_free_bytes = Gauge(p + "kv_free_bytes", "KV memory a new session may take "
                                   "(0: no --kv-cache-gb bound)", registry=r)
        self.kv_evictions = Counter(p + "kv_evictions", "Blocks evicted from a tier",
                                    ["tier"], registry=r)
        self.kv_disk_restores = Counter(p + "kv_disk_restores", "Blocks read back from disk",
                                        registry=r)
        self.kv_checksum_failures = Counter(p + "kv_checksum_failures", "Disk blocks that "
                                            "failed their checks (dropped, recomputed)",
                                            registry=r)
        self.kv_disk_write_failures = Counter(p + "kv_disk_write_failures", "Blocks that "
                                              "could not be written to disk (full, I/O error)",
                                              registry=r)
        self.queue_wait = Histogram(p + "queue_wait_seconds", "Verify request queued to its "
                                    "pass, by the node's standing class", ["standing"],
                                    buckets=_SECONDS_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_seconds", "Time between a session's answers "
                             "per token they committed (what its user sees), by standing "
                             "class", ["standing"], buckets=_SECONDS_BUCKETS, registry=r)
        self.admissions_refused = Counter(
            p + "admissions_refused", "Sessions refused BUSY because their prefill could not "
            "start within --admit-wait", registry=r)
        self.receipts = Counter(p + "receipts", "Receipts handed to the ledger, by outcome",
                                ["status"], registry=r)
        # The committed-token count again as a plain int, for the advertisement.
        self.committed_total = 0

    def record_store(self, store: BlockStore) -> None:
        """Bring the KV block figures up to date (counters by their growth since last)."""
        with store.lock:  # the engine thread may be sealing blocks meanwhile
            self._record_store(store)

    def _record_store(self, store: BlockStore) -> None:
        st = store.stats
        for counter, value in ((self.prefix_queries, st.queries), (self.prefix_hits, st.hits),
                               (self.kv_disk_restores, st.disk_restores),
                               (self.kv_checksum_failures, st.checksum_failures),
                               (self.kv_disk_write_failures, st.disk_write_failures)):
            _advance(counter, value)
        for tier, n in st.evictions.items():
            _advance(self.kv_evictions.labels(tier=tier), n)
        device = store.resident_bytes()
        self.kv_blocks.labels(tier="device").set(len(store.blocks))
        self.kv_bytes.labels(tier="device").set(device)
        self.kv_blocks.labels(tier="host").set(len(store.host))
        self.kv_bytes.labels(tier="host").set(len(store.host) * store.block_bytes)
        disk = store.disk
        self.kv_blocks.labels(tier="disk").set(len(disk.files) if disk else 0)
        self.kv_bytes.labels(tier="disk").set(disk.used if disk else 0)
        self.kv_free_bytes.set(max(store.free_bytes(), 0) if store.budget < 1 << 61 else 0)
        self.kv_session_bytes.set(store.referenced_bytes()
                                  + sum(s.tail_bytes() for s in store.sessions))

    def record_pass(self, verify_jobs: int, jobs: int, tokens: int, seconds: float) -> None:
        if verify_jobs:
            self.batch_size.observe(verify_jobs)
        self.batch_jobs.observe(jobs)
        self.batch_tokens.observe(tokens)
        self.pass_seconds.observe(seconds)
        self.busy_seconds.inc(seconds)

    def record_audit(self, seconds: float, tokens: int) -> None:
        """Count one transcript replayed for a node's audit (see verifier.audit)."""
        self.audits_served.inc()
        self.audit_seconds.inc(seconds)
        self.audit_tokens.inc(tokens)

    def record_verdict(self, drafted: int, accepted: Sequence[int]) -> None:
        """Count a verdict; an empty tree (a plain target step, such as a session's first
        token) commits a token but is no draft, so vLLM's draft counters skip it."""
        self.committed_tokens.inc(len(accepted) + 1)
        self.committed_total += len(accepted) + 1  # the Advertisement's counter
        if not drafted:
            self.plain_steps.inc()
            return
        self.num_drafts.inc()
        self.num_draft_tokens.inc(drafted)
        self.num_accepted_tokens.inc(len(accepted))
        for pos in range(min(len(accepted), MAX_POSITIONS)):
            self.num_accepted_per_pos.labels(position=str(pos)).inc()

    def serve(self, port: int) -> int:
        """Serve /metrics on 127.0.0.1:`port` from a daemon thread; return the port."""
        server, _thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        return int(server.server_port)


def _advance(counter: Counter, value: float) -> None:
    """Move a counter up to `value` (a total kept elsewhere)."""
    now = counter._value.get()
    if value > now:
        counter.inc(value - now)
