"""The dashboard, in one place: one static page (index.html, dashboard.js,
dashboard.css here) served by both the daemon's control endpoint
(ingestd.observe.control) and `ingestd serve` (ingestd.server.app).

- page.py: the page's assets and headers, and the JSON error and thumbnail responses
- serve.py: the data routes on `ingestd serve` (datasets, items, blob thumbnails)
- items.py: what the daemon's dashboard shows of a ledger item, and its thumbnail's file
"""

from __future__ import annotations

from ingestd.dashboard.items import item_json, parse_plan, thumb_source, unchanged
from ingestd.dashboard.page import (
    CSP,
    DASHBOARD_DIR,
    add_static_routes,
    json_error,
    page_headers,
    thumb_response,
)
from ingestd.dashboard.serve import add_dashboard_routes

__all__ = [
    "CSP",
    "DASHBOARD_DIR",
    "add_dashboard_routes",
    "add_static_routes",
    "item_json",
    "json_error",
    "page_headers",
    "parse_plan",
    "thumb_response",
    "thumb_source",
    "unchanged",
]
