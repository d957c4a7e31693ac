"""The chat page `edge-memdec serve` answers at `/`: plain HTML, CSS and JavaScript files in this folder,
served as they are (no build step, nothing fetched from elsewhere, so it works offline)."""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Sent with every page file: always revalidated (a new version shows on reload), never sniffed into another
# type, and the page may load and call only its own server.
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}


def page_file(name: str) -> tuple[bytes, str] | None:
    """The bytes and Content-Type of the page file called `name` ("index.html", "app.js"), or None.

    `name` is looked up among the files of this folder, never joined to a path, so no request reaches a file
    outside it."""
    files = {path.name: path for path in FOLDER.iterdir() if path.suffix in CONTENT_TYPES}
    path = files.get(name)
    if path is None:
        return None
    return path.read_bytes(), CONTENT_TYPES[path.suffix]
