"""What an operator sees of a running daemon.

- control.py: the control endpoint (aiohttp server and its routes)
- listen.py: where it listens, control.addr, which Host headers it answers
- activity.py: recent outcomes per watch, for the dashboard
- metrics.py: the Prometheus metrics
- status.py: the status report (`ingestd status`, /api/status), read from the ledger
"""
