"""SpecEdge monitor: a public view of the swarm (`specedge monitor`).

It crawls the DHT for every peer, asks each one for its advertisement, looks up the
providers of every model seen, and serves a web page and ``/api/state``: models, each
verifier's figures and reachability, misbehaving peers, totals, and with a ledger a
leaderboard, the cost per token and the network's throughput over time.

Modules: ``crawl`` (DHT walk and advert queries), ``state`` (the swarm over time),
``leaderboard`` (the ledger's figures), ``page`` (HTML and SVG), ``server`` (the loops
and the web server), ``cli`` (arguments). It uses ``specedge.protocol`` and
``specedge.ledger`` only: never node or verifier code, never torch.
"""
