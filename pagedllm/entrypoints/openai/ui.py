"""The web chat page of ``pagedllm serve --ui``: ``GET /ui`` (plain HTML, CSS and JS files).

The page (``pagedllm/assets/ui/``) needs no build step: it lists the models, streams answers
from ``/v1/chat/completions`` over server-sent events read from ``fetch``, and its Stop button
aborts the request, which the server notices as a disconnect and aborts in the engine.

``UIMiddleware`` answers the page's three files itself, in front of the auth gate: a browser
cannot attach an API key to a page load, and the files hold no secret (the page asks for the
key and sends it with its API calls, which the gate checks as any other). Everything else
passes through. The files are read once, at start-up, and sent with a Content-Security-Policy
that allows only this origin's scripts and connections.
"""

from __future__ import annotations

from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

UI_DIR = Path(__file__).resolve().parents[2] / "assets" / "ui"
_FILES = {
    "/ui": ("index.html", "text/html; charset=utf-8"),
    "/ui/": ("index.html", "text/html; charset=utf-8"),
    "/ui/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/ui/chat.css": ("chat.css", "text/css; charset=utf-8"),
}
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class UIMiddleware:
    """Serves ``GET``/``HEAD`` of the chat page's files; passes every other request on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.files = {
            path: ((UI_DIR / name).read_bytes(), ctype) for path, (name, ctype) in _FILES.items()
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        found = self.files.get(path) if scope["type"] == "http" else None
        if found is None or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        body, ctype = found
        headers = [
            (b"content-type", ctype.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"content-security-policy", _CSP.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"cache-control", b"no-cache"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )
