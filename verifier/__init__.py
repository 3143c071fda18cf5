"""The verifier host daemon (`specedge-verifier serve`).

Modules, one noun each:

- ``engine``: the batched target forward (packed jobs, per-session attention and KV).
- ``scheduler``: continuous batching of verify requests and chunked prefill.
- ``sessions``: sessions and the per-host / per-peer slot limits.
- ``receipts``: signing receipts and writing them to the ledger off the event loop.
- ``metrics``: the Prometheus registry.
- ``host``: libp2p stream handlers, the wire conversation (documented there), shutdown.
- ``cli``: the command line.
"""
