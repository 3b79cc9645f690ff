"""The dashboard page: its template with the data embedded, so the page is complete on load.

The data goes in a ``<script type="application/json">`` island that the page's script draws
synchronously; without it (the reader has not shown a key yet) the script fetches the JSON.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1] / "templates" / "dashboard.html"
SLOT = "__DASHBOARD_DATA__"


def render(workflows: bytes | None, view: bytes | None) -> str:
    """The page, with ``{"workflows": ..., "view": ...}`` (JSON bytes) embedded, or ``null``."""
    if workflows is None:
        data = b"null"
    else:
        data = b'{"workflows":' + workflows + b',"view":' + (view or b"null") + b"}"
    # "<" occurs only inside JSON strings, where \u003c means the same: no "</script>" can end it
    island = data.replace(b"<", b"\\u003c").decode("utf-8")
    return TEMPLATE.read_text(encoding="utf-8").replace(SLOT, island)
