"""SpecEdge wire protocol: everything that crosses the network, defined once.

Modules (import them directly; this package imports nothing heavy on its own):

- ``specedge_pb2``: generated from ``specedge.proto`` (run ``make proto`` after edits).
- ``framing``: uvarint length-prefixed Frames on libp2p streams, with limits and timeouts.
- ``envelopes``: signed envelopes (libp2p RFC 0002 style) for requests and receipts.
- ``identity``: Ed25519 peer identity files.
- ``validation``: one check per message; every failure is a typed ``ProtocolError``.
- ``errors``, ``limits``, ``ids`` (protocol ids, versions, DHT keys), ``varint``.
"""
