"""The ranking server's pure-ASGI middleware (API key, body limit) and the log filter for client errors."""
from __future__ import annotations

import json
import logging

from serving.settings import ServeSettings

log = logging.getLogger("kairos.service")


class ApiKeyMiddleware:
    """Pure-ASGI check of the `x-api-key` header on /v1/* (health, readiness and /metrics stay open)."""

    def __init__(self, app, key: str, prefix: str = "/v1/") -> None:
        self.app, self.key, self.prefix = app, key.encode(), prefix

    async def __call__(self, scope, receive, send) -> None:
        import hmac

        if scope.get("type") == "http" and scope.get("path", "").startswith(self.prefix):
            provided = dict(scope.get("headers") or []).get(b"x-api-key", b"")
            if not hmac.compare_digest(provided, self.key):
                body = json.dumps({"error": "unauthorized",
                                   "detail": "missing or wrong x-api-key header (KAIROS_API_KEY is set)"}).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


try:  # a C JSON encoder for the answers (several times faster than json.dumps); json when not installed
    import orjson

    def dumps(payload: dict) -> bytes:
        return orjson.dumps(payload, default=str, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
except ImportError:  # pragma: no cover - orjson is pinned in requirements.lock
    def dumps(payload: dict) -> bytes:
        return json.dumps(payload, separators=(",", ":"), default=str).encode()


def _json_response(status: int, payload: dict, headers: list | None = None) -> tuple[dict, dict]:
    body = dumps(payload)
    return ({"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *(headers or [])]},
            {"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Pure-ASGI request guard: a body over `max_bytes` is a 413 before any handler parses (or echoes) it (a
    declared Content-Length is checked up front; a chunked body is read up to the limit and replayed), and a
    /v1/* body that is not JSON is a 415 (BentoML answered a multipart body with a 500)."""

    def __init__(self, app, max_bytes: int = ServeSettings.max_body_bytes) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, send, size: str) -> None:
        start, body = _json_response(413, {"error": "request body too large",
                                           "detail": f"the body is {size} bytes; the limit is {self.max_bytes} "
                                                     "(KAIROS_MAX_BODY_BYTES): send fewer events per request"})
        await send(start)
        await send(body)

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        media = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
        if scope.get("path", "").startswith("/v1/") and media not in (b"application/json", b""):
            start, refusal = _json_response(415, {"error": "unsupported media type", "detail":
                                                  f"Content-Type {media.decode(errors='replace')!r}: send application/json"})
            await send(start)
            await send(refusal)
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, declared.decode())
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._refuse(send, f"more than {size}")
                return
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ClientErrorLogFilter(logging.Filter):
    """BentoML logs every 400 (a body that fails validation) as ERROR with a 25-line traceback: a client's
    mistake is not a server error. Turn those records into one WARNING line naming the route and the fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        from pydantic import ValidationError

        from bentoml.exceptions import BentoMLException

        if isinstance(exc, ValidationError):
            fields = "; ".join(".".join(str(p) for p in e.get("loc", ())) + f": {e.get('msg')}" for e in exc.errors())
            what = f"400 {exc.error_count()} validation error(s): {fields}"
        elif isinstance(exc, BentoMLException) and int(getattr(exc.error_code, "value", 500)) < 500:
            what = f"{int(exc.error_code.value)} {type(exc).__name__}: {exc}"
        else:
            return True  # a real server error keeps its traceback
        record.msg, record.args = "client error on %s: %s", (record.getMessage().removeprefix("Exception on "), what[:500])
        record.levelno, record.levelname, record.exc_info, record.exc_text = logging.WARNING, "WARNING", None, None
        return True


def _install_client_error_filter() -> None:
    target = logging.getLogger("bentoml._internal.server.http_app")
    if not any(isinstance(f, ClientErrorLogFilter) for f in target.filters):
        target.addFilter(ClientErrorLogFilter())
