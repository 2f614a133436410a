"""``fairtune review``: the HTTP server of the page that reviews an audit and flags biased outputs.

``fairtune review --audit DIR --db flags.sqlite`` serves (Python's ``http.server``, no framework) the
page :class:`fairtune.eval.AuditView` renders: every audited prompt's image grid, its judged mix with
95% intervals against the target, and buttons to flag one image or the whole prompt as biased (with
the direction seen and a note), and to propose a prompt to audit next. Flags land in the flag store
(:class:`fairtune.data.FlagStore`) with the prompt, the model and adapter (by content hash), the audit
folder and the image's index, its seed and the generation settings that regenerate it.

Bound to a loopback address (the default ``127.0.0.1``) there is no login, and a request is answered
only when its ``Host`` header names this machine (``localhost``, ``127.0.0.1``, ``[::1]`` or the bound
address, with any port), so a page whose site name was re-pointed at 127.0.0.1 (DNS rebinding) cannot
read or write. Bound to any other interface every request must carry a token (generated unless
``--token`` is given, printed with the URL). Writes are accepted only as ``application/json`` POSTs,
which a page from another origin cannot send without a preflight this server never answers, with a
``Content-Length`` of at most :data:`MAX_BODY` bytes (a body is never read without one).

Light: importing this module never loads torch, Lightning or diffusers.
"""

from __future__ import annotations

import getpass
import hmac
import ipaddress
import json
import mimetypes
import re
import secrets
import sys
import threading
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

from fairtune.data import FlagStore, Proposal
from fairtune.eval import AuditView

TOKEN_HEADER = "X-Review-Token"
"""The header that carries the token (the page's script sends it with every write)."""
_COOKIE = "fairtune_review_token"
MAX_BODY = 1 << 16
"""The largest request body read (bytes); a longer one is refused (413) unread."""
_LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")
_IMAGE_PATH = re.compile(r"/img/([0-9]{1,6})/([0-9]{1,6})")
_LENGTH = re.compile(r"[0-9]{1,12}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ReviewServer(ThreadingHTTPServer):
    """The review page's HTTP server.

    Args:
        view: The audit shown.
        store: The flag store written to.
        host: Interface to bind; loopback needs no token.
        port: Port (0: any free port).
        token: Required on every request when not on loopback; ``None`` there: a random one.
        reviewer: Default reviewer id shown on the page.
    """

    daemon_threads = True

    def __init__(self, view: AuditView, store: FlagStore, host: str = "127.0.0.1", port: int = 8765,
                 token: str | None = None, reviewer: str | None = None) -> None:  # fmt: skip
        self.view = view
        self.store = store
        self.reviewer = reviewer or getpass.getuser()
        self.token = None if is_loopback(host) else (token or secrets.token_urlsafe(18))
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        base = f"http://{host}:{port}/"
        return base + (f"?token={self.token}" if self.token else "")


class _Handler(BaseHTTPRequestHandler):
    server: ReviewServer
    timeout = 60  # seconds a client may take to send its request: a stalled one frees its thread

    def log_message(self, format, *args) -> None:  # quiet: one line per write only
        pass

    def _send(self, code: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj) -> None:
        self._send(code, json.dumps(obj).encode(), "application/json")

    def _host_allowed(self) -> bool:
        """Off loopback the token guards every request; on loopback (no token) the request must be
        addressed to this machine by name or address: one ``Host`` header, with any port."""
        if self.server.token is not None:
            return True
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1:
            return False
        names = {*_LOCAL_NAMES, str(self.server.server_address[0])}
        match = re.fullmatch(r"(\[[^\]]*\]|[^:\[\]]*)(?::[0-9]{1,5})?", hosts[0].strip().lower())
        return match is not None and match.group(1) in names

    def _refuse_host(self) -> bool:
        """Answer 403 and return True when :meth:`_host_allowed` refuses the request."""
        if self._host_allowed():
            return False
        self._send(403, b"this server answers only to localhost, 127.0.0.1 or [::1]", "text/plain")
        return True

    def _split(self) -> tuple[str, dict]:
        """The request's path and query (any request target: no URL parsing that can fail)."""
        path, _, query = self.path.partition("?")
        return path, parse_qs(query)

    def _body(self) -> bytes | None:
        """The request body, or ``None`` after answering 411/400/413: a body is read only when one
        ``Content-Length`` gives its size in ASCII digits, at most :data:`MAX_BODY`."""
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths or "Transfer-Encoding" in self.headers:
            self._json(411, {"error": "send the body with a Content-Length"})
            return None
        if len(lengths) != 1 or not _LENGTH.fullmatch(lengths[0].strip()):
            self._json(400, {"error": "Content-Length must be one non-negative integer"})
            return None
        length = int(lengths[0])
        if length > MAX_BODY:
            self._json(413, {"error": f"request body too large ({length} bytes; at most {MAX_BODY})"})
            return None
        try:
            body = self.rfile.read(length)
        except TimeoutError:  # the client stopped sending (see ``timeout``)
            body = b""
        if len(body) != length:
            self._json(400, {"error": "the body is shorter than its Content-Length"})
            return None
        return body

    def _authorised(self, query: dict) -> bool:
        token = self.server.token
        if token is None:
            return True
        given = (query.get("token") or [""])[0] or self.headers.get(TOKEN_HEADER, "")
        if not given:
            cookie = SimpleCookie(self.headers.get("Cookie", ""))
            given = cookie[_COOKIE].value if _COOKIE in cookie else ""
        return hmac.compare_digest(given.encode(), token.encode())

    def do_GET(self) -> None:
        if self._refuse_host():
            return
        path, query = self._split()
        if not self._authorised(query):
            self._send(401, b"a token is required: open the URL `fairtune review` printed", "text/plain")
            return
        view = self.server.view
        if path == "/":
            headers = {}
            if self.server.token:
                headers["Set-Cookie"] = f"{_COOKIE}={self.server.token}; HttpOnly; SameSite=Strict; Path=/"
            page = view.page(self.server.reviewer, self.server.store.flags(audit_run=str(view.dir)))
            self._send(200, page.encode(), "text/html; charset=utf-8", headers)
        elif path.startswith("/img/"):
            # ASCII digits only: int() also reads other scripts' digits and fails on superscripts
            match = _IMAGE_PATH.fullmatch(path)
            image = match and view.images_dir / f"{int(match[1]):03d}" / f"{int(match[2]):04d}.png"
            if not image or not image.is_file():
                self._send(404, b"not found", "text/plain")
                return
            self._send(200, image.read_bytes(), mimetypes.guess_type(image.name)[0] or "image/png")
        elif path == "/api/flags":
            flags = self.server.store.flags(audit_run=str(view.dir))
            self._json(200, [{"id": f.id, "prompt": f.prompt, "scope": f.scope, "index": f.image_index,
                              "direction": f.direction, "reviewer": f.reviewer} for f in flags])  # fmt: skip
        else:
            self._send(404, b"not found", "text/plain")

    def do_POST(self) -> None:
        if self._refuse_host():
            return
        path, query = self._split()
        if not self._authorised(query):
            self._json(401, {"error": "a token is required"})
            return
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            self._json(415, {"error": "send application/json"})
            return
        body = self._body()
        if body is None:
            return
        try:
            try:
                data = json.loads(body or b"{}")
            except RecursionError:
                raise ValueError("the JSON is nested too deeply") from None
            if not isinstance(data, dict):
                raise ValueError("send a JSON object")
            if path == "/api/flag":
                fid = self.server.store.add_flag(self.server.view.flag(data))
            elif path == "/api/propose":
                fid = self.server.store.add_proposal(
                    Proposal(prompt=str(data.get("prompt") or "").strip(),
                             concept=str(data.get("concept") or "").strip() or None,
                             reviewer=str(data.get("reviewer") or "").strip(),
                             note=str(data.get("note") or ""))
                )  # fmt: skip
            else:
                self._json(404, {"error": "not found"})
                return
        except (ValueError, json.JSONDecodeError) as e:
            self._json(400, {"error": str(e)})
            return
        print(f"review: {path[5:]} {fid} by {data.get('reviewer')!r}", file=sys.stderr)
        self._json(200, {"id": fid})


def serve_review(audit: str | Path, db: str, *, host: str = "127.0.0.1", port: int = 8765,
                 token: str | None = None, reviewer: str | None = None, method: str | None = None,
                 background: bool = False) -> ReviewServer:  # fmt: skip
    """Start the review server (in a daemon thread with ``background``, else blocking until Ctrl-C)."""
    server = ReviewServer(AuditView(audit, method), FlagStore(db), host, port, token, reviewer)
    if server.token:
        print(
            f"review: bound to {host}, not a loopback address: every request needs the token. "
            f"Open\n  {server.url}",
            file=sys.stderr,
        )
    else:
        print(f"review: no login on {host} (loopback only). Open\n  {server.url}", file=sys.stderr)
    if background:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return server


def review_command(
    *,
    audit: Path,
    db: str = "flags.sqlite",
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    reviewer: str | None = None,
    method: str | None = None,
) -> None:
    """Serve a page to review an audit and flag biased images or prompts into the flag store.

    Args:
        audit: A folder written by ``fairtune audit``.
        db: The flag store: a SQLite file or a SQLAlchemy URL (e.g. ``postgresql+psycopg://...``).
        host: Interface to bind. Loopback (default): no login; any other: a token is required.
        port: Port.
        token: The token for a non-loopback interface (default: a random one, printed).
        reviewer: Default reviewer id on the page (default: the user name).
        method: The method to review in a ``fairtune compare`` folder (default: the first).
    """
    serve_review(audit, db, host=host, port=port, token=token, reviewer=reviewer, method=method)
