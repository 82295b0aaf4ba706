"""The HTTP guard, before any handler runs: the Host header (DNS rebinding), the Origin of
requests with side effects, the API key, CORS for origins allowed with --allow-origin, the
Content-Type of bodies; and the limits every connection lives under (docs/architecture.md).
Loopback by default; no CORS headers at all unless asked (the page is same-origin)."""

from __future__ import annotations

import hmac
import logging
import re

from starlette.responses import Response

from .errors import ApiError
from .errors import error_response

MAX_BODY = 8 * 1024 * 1024


# Host header: a name or address and an optional port, nothing else (127.0.0.1:PORT@evil.example
# is refused, not read as 127.0.0.1).
_HOST = re.compile(r"(?P<name>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>[0-9]{1,5}))?\Z")
JSON_TYPE = re.compile(r"application/(?:[\w.+-]+\+)?json\s*(?:;.*)?\Z", re.IGNORECASE)
log = logging.getLogger("bundle.server")


def parse_host(value: str) -> tuple[str, int | None] | None:
    m = _HOST.match(value or "")
    if not m:
        return None
    port = int(m.group("port")) if m.group("port") else None
    return m.group("name").lower(), port


class Guard:
    """ASGI middleware, before any handler runs: the Host header (DNS rebinding), the Origin of
    browser requests (no other web page may drive the model), JSON content types, the API key,
    the body size cap, and one error boundary that turns any failure into an API-shaped 500."""

    def __init__(self, app, allowed_hosts: set[str] | None, api_key: str | None,
                 allowed_origins: set[str] | None = None):
        self.app, self.allowed_hosts, self.api_key = app, allowed_hosts, api_key
        self.allowed_origins = {o.rstrip("/").lower() for o in (allowed_origins or ())}

    def _host_ok(self, host: str) -> bool:
        if self.allowed_hosts is None:
            return True
        parsed = parse_host(host)
        if parsed is None:
            return False
        name, port = parsed
        return (name if port is None else f"{name}:{port}") in self.allowed_hosts

    def _origin_ok(self, origin: str | None, host: str, fetch_site: str | None) -> bool:
        """A browser names the page that sent a request in Origin; only this server's own page
        (same scheme, host and port) or an origin allowed with --allow-origin may."""
        if origin is None:
            # Browsers send Origin with every POST; without it, a cross-site request shows in
            # Sec-Fetch-Site. Non-browser clients (the openai SDK, curl) send neither.
            return fetch_site in (None, "same-origin", "none")
        origin = origin.strip().lower().rstrip("/")
        if origin in self.allowed_origins:
            return True
        return origin == f"http://{host.lower()}" and self._host_ok(host)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            await self._guarded(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - the boundary: a one-line log, an API-shaped 500
            log.error("error: unexpected %s in %s %s: %s", type(exc).__name__, scope.get("method"),
                      scope.get("path"), exc)
            try:
                await error_response(ApiError(500, "the server failed on this request", None, "internal_error",
                                              "server_error"))(scope, receive, send)
            except Exception:  # noqa: BLE001 - the response had begun: nothing more to send
                pass

    async def _guarded(self, scope, receive, send):
        headers = {}
        for k, v in scope["headers"]:
            key = k.decode("latin-1").lower()
            if key in headers and key in ("host", "origin", "content-type", "authorization", "x-api-key"):
                return await self._refuse(scope, receive, send, 400, f"the {key} header is given twice",
                                          "invalid_header")
            headers[key] = v.decode("latin-1")
        if "transfer-encoding" in headers and "content-length" in headers:
            return await self._refuse(scope, receive, send, 400, "the request has both Content-Length and "
                                      "Transfer-Encoding; send one of them", "invalid_framing", close=True)
        host = headers.get("host", "")
        if not self._host_ok(host):
            return await self._refuse(
                scope, receive, send, 403,
                f"Host '{host[:100]}' is not served here (DNS rebinding protection); use the URL the server printed",
                "invalid_host", "permission_error")
        origin = headers.get("origin")
        if not self._origin_ok(origin, host, headers.get("sec-fetch-site")):
            return await self._refuse(
                scope, receive, send, 403,
                f"requests from the web page at {(origin or 'another site')[:100]} are refused: only this "
                "server's own page may use it (start it with --allow-origin ORIGIN to allow one)",
                "invalid_origin", "permission_error")
        if scope["method"] == "OPTIONS":
            return await self._preflight(scope, receive, send, origin, headers.get("access-control-request-headers"))
        path = scope["path"]
        if scope["method"] == "POST" and (path.startswith("/v1/") or path == "/lora-adapters"):
            if not JSON_TYPE.match(headers.get("content-type", "")):
                return await self._refuse(
                    scope, receive, send, 415,
                    "the request body must be JSON, sent with 'Content-Type: application/json'",
                    "unsupported_media_type")
        # With --api-key, everything but the page, its files and the liveness check (/health: slot
        # counts, what a load balancer polls, open on llama-server too) needs the key: the API,
        # /info, /metrics and /apply-template (which shows the bundle's system prompt).
        # Anthropic's clients send the key as x-api-key instead.
        if self.api_key and path not in ("/", "/health") and not path.startswith("/static/"):
            auth = headers.get("authorization", "")
            if "x-api-key" in headers and not auth:
                auth = "Bearer " + headers["x-api-key"]
            if not hmac.compare_digest(auth.encode("latin-1"), f"Bearer {self.api_key}".encode("utf-8")):
                msg = "missing API key: send 'Authorization: Bearer KEY'" if not auth else "incorrect API key"
                return await self._refuse(scope, receive, send, 401, msg, "invalid_api_key", "authentication_error")
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            return await self._refuse(scope, receive, send, 400, "the Content-Length header is not a number",
                                      "invalid_framing", close=True)
        if length is not None and int(length) > MAX_BODY:
            return await self._refuse(scope, receive, send, 413, f"the request body is larger than {MAX_BODY} bytes",
                                      "request_too_large")
        if origin is not None and origin.strip().lower().rstrip("/") in self.allowed_origins:
            send = _with_cors(send, origin.strip())
        await self.app(scope, receive, send)

    async def _refuse(self, scope, receive, send, status, message, code, type_="invalid_request_error",
                      close: bool = False):
        """close: a request whose framing is in doubt; where its body ends is not known, so the
        connection is closed after the answer (what follows is not a request to serve)."""
        return await error_response(ApiError(status, message, None, code, type_), close=close,
                                    path=scope.get("path", ""))(scope, receive, send)

    async def _preflight(self, scope, receive, send, origin, requested_headers):
        """CORS preflight: answered only for an origin allowed with --allow-origin."""
        if origin is None or origin.strip().lower().rstrip("/") not in self.allowed_origins:
            return await self._refuse(scope, receive, send, 405, "OPTIONS is not allowed here", "method_not_allowed")
        # No body: a 204 has none (h11 refuses to send one, and the preflight failed with a 500).
        response = Response(status_code=204, headers={
            "Access-Control-Allow-Origin": origin.strip(), "Vary": "Origin, Access-Control-Request-Headers",
            "Access-Control-Allow-Methods": "GET, POST",
            "Access-Control-Allow-Headers": _allowed_headers(requested_headers),
            "Access-Control-Max-Age": "600"})
        await response(scope, receive, send)


_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}\Z")


def _allowed_headers(requested: str | None) -> str:
    """The preflight's allowed headers: those the page asks for (the official JavaScript SDKs send
    x-stainless-* headers, Anthropic's anthropic-version and x-api-key) when each is a plain header
    name, and always Authorization and Content-Type. Only origins given with --allow-origin get here."""
    names = ["Authorization", "Content-Type"]
    for name in (requested or "").split(",")[:64]:
        name = name.strip()
        if _HEADER_NAME.match(name) and name.lower() not in (n.lower() for n in names):
            names.append(name)
    return ", ".join(names)


def _with_cors(send, origin: str):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = dict(message)
            message["headers"] = list(message.get("headers", [])) + [
                (b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        await send(message)
    return wrapped
