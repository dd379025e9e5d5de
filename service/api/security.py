"""API keys, per-key ownership of slides and jobs, and request-rate limits.

With `PIXELCAM_API_KEYS` empty the API is open (every request is the `anonymous` principal). With keys, every
route but health, metrics and the viewer's static files needs one: `Authorization: Bearer <key>`, or, for a
browser, `?api_key=<key>` once, which the server turns into an HttpOnly, SameSite=Strict cookie so that the
viewer's own requests (tile images included) carry it. A key sees only the slides and jobs it created: another
key's ids answer 404, exactly like ids that do not exist.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import constants
from service.errors import JobNotFound, SlideNotFound
from service.jobs.queue import JobQueue
from service.lru import LRUCache
from service.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["Principal", "SecurityMiddleware", "RateLimiter", "authorize", "principal_of", "key_id", "KEY_COOKIE",
           "grant_slide", "owns_slide", "record_job", "owned_job_ids", "active_jobs", "RedactSecrets", "redact",
           "install_log_redaction"]

KEY_COOKIE = "pixelcam_key"
KEY_QUERY = "api_key"
_SECRET_QUERY = re.compile(r"(?i)\b(api_key|apikey|access_token|token|key)=[^&\s\"']*")
_SECRET_HEADER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+")


def redact(text: str) -> str:
    """The text with the values of key-bearing query parameters and bearer tokens replaced by `[redacted]`."""
    return _SECRET_HEADER.sub(r"\1 [redacted]", _SECRET_QUERY.sub(r"\1=[redacted]", text))


class RedactSecrets(logging.Filter):
    """A logging filter that redacts keys in a record's message and arguments (e.g. the access log's URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


def install_log_redaction() -> None:
    """Put RedactSecrets on uvicorn's access and error loggers (once; they log the request line themselves)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        target = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in target.filters):
            target.addFilter(RedactSecrets())


_OPEN_PREFIXES = ("/healthz", "/readyz", "/metrics", "/static/", "/favicon.ico")
_OPEN_PATHS = ("/",)


def key_id(token: str) -> str:
    """A stable, non-secret name of a key (what Redis and the logs see): 16 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Principal:
    """Who sent a request: a key id (`anonymous` on an open API) and whether it may change the models."""

    key_id: str
    admin: bool
    authenticated: bool


ANONYMOUS = Principal(constants.ANONYMOUS, admin=True, authenticated=False)


class RateLimiter:
    """Token buckets per principal: `rate` requests per second with bursts of `burst`; thread-safe."""

    def __init__(self, rate_per_s: float, burst: int, max_clients: int = 100_000) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_clients = max_clients
        self._lock = threading.Lock()  # the read-modify-write of one bucket is one step
        # (tokens, last refill) per client; beyond max_clients the least recent is forgotten (bounded memory)
        self._buckets: LRUCache[str, tuple[float, float]] = LRUCache(max_items=max_clients)

    def take(self, who: str, now: float | None = None) -> float:
        """Spend one token; returns 0 when allowed, else the seconds until a token is available."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(who) or (self.burst, now)
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            self._buckets.put(who, (tokens - 1.0 if allowed else tokens, now))
        return 0.0 if allowed else (1.0 - tokens) / self.rate

    def clients(self) -> list[str]:
        """The clients whose buckets are remembered, least recently seen first."""
        return [who for who, _ in self._buckets.items()]


def is_open_path(path: str) -> bool:
    """Routes answered without a key: health, readiness, metrics, the index page and static files."""
    return path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES)


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _token_of(scope: Scope) -> tuple[str, bool]:
    """(the key the request carries, whether it came in the query string) from header, query or cookie."""
    headers = _headers(scope)
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip(), False
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if query.get(KEY_QUERY):
        return query[KEY_QUERY][0], True
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # a malformed cookie header is the same as none
        return "", False
    morsel = cookie.get(KEY_COOKIE)
    return (morsel.value if morsel else ""), False


async def _send_error(send: Send, status: int, error: str, detail: str, headers: dict[str, str]) -> None:
    body = json.dumps({"error": error, "detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class SecurityMiddleware:
    """ASGI middleware: who is asking (API key), may they (401), not too often (429); sets the viewer cookie."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._keys = {hashlib.sha256(k.encode()).digest(): k for k in settings.api_key_list}
        self._admins = {hashlib.sha256(k.encode()).digest() for k in settings.admin_key_list}
        self.limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_burst)

    def _lookup(self, token: str) -> Principal | None:
        digest = hashlib.sha256(token.encode()).digest()
        for known in self._keys:
            if hmac.compare_digest(digest, known):
                return Principal(key_id(token), admin=not self._admins or known in self._admins,
                                 authenticated=True)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        open_path = is_open_path(path) or scope.get("method") == "OPTIONS"
        principal: Principal | None = ANONYMOUS
        token, from_query = "", False
        if self._keys:
            token, from_query = _token_of(scope)
            principal = self._lookup(token) if token else None
        if not open_path:
            # requests without a valid key are counted per client address: guessing keys is rate-limited too
            who = principal.key_id if principal and principal.authenticated else _client(scope)
            wait_s = self.limiter.take(who)
            if wait_s > 0:
                await _send_error(send, 429, "RateLimited",
                                  f"more than {self.settings.rate_limit_per_s:g} requests/s from this key; slow "
                                  f"down and retry after {wait_s:.1f} s (PIXELCAM_RATE_LIMIT_PER_S)",
                                  {"Retry-After": str(max(1, int(wait_s + 0.999)))})
                return
            if principal is None:
                what = "an unknown API key" if token else "no API key"
                await _send_error(send, 401, "Unauthorized",
                                  f"this server needs an API key and the request carries {what}; send "
                                  "`Authorization: Bearer <key>` (browsers: open the page once with ?api_key=<key>)",
                                  {"WWW-Authenticate": "Bearer"})
                return
        scope.setdefault("state", {})["principal"] = principal or ANONYMOUS
        if from_query and principal is not None:
            send = self._with_cookie(send, token, scope.get("scheme") == "https")
        await self.app(scope, receive, send)

    @staticmethod
    def _with_cookie(send: Send, token: str, secure: bool) -> Send:
        cookie = f"{KEY_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "")

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            await send(message)

        return wrapped


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"client:{client[0]}" if client else "client:unknown"


def principal_of(request: Request) -> Principal:
    """The principal the middleware found (anonymous when the app runs without it)."""
    found = request.scope.get("state", {}).get("principal")
    return found if isinstance(found, Principal) else ANONYMOUS


# --- ownership (Redis) ----------------------------------------------------------------------------------------
def grant_slide(queue: JobQueue, who: Principal, slide_id: str) -> None:
    """Record that this key uploaded the slide (re-uploads of the same bytes by another key grant it too)."""
    queue.redis.sadd(queue.settings.key(constants.OWNER_SLIDES_KEY, key_id=who.key_id), slide_id)


def owns_slide(queue: JobQueue, who: Principal, slide_id: str) -> bool:
    """True on an open API, or when this key uploaded the slide."""
    if not who.authenticated:
        return True
    return bool(queue.redis.sismember(queue.settings.key(constants.OWNER_SLIDES_KEY, key_id=who.key_id), slide_id))


def record_job(queue: JobQueue, who: Principal, job_id: str, created_at: float) -> None:
    """Index a job under the key that submitted it (and count it as active until it is seen finished)."""
    with queue.redis.pipeline(transaction=False) as pipe:
        pipe.zadd(queue.settings.key(constants.OWNER_JOBS_KEY, key_id=who.key_id), {job_id: created_at})
        pipe.sadd(queue.settings.key(constants.OWNER_ACTIVE_KEY, key_id=who.key_id), job_id)
        pipe.execute()


def owned_job_ids(queue: JobQueue, who: Principal, limit: int) -> list[str]:
    """The key's most recent job ids (every job on an open API)."""
    if not who.authenticated:
        return queue.list_ids(limit)
    key = queue.settings.key(constants.OWNER_JOBS_KEY, key_id=who.key_id)
    return list(queue.redis.zrevrange(key, 0, limit - 1))  # type: ignore[arg-type]


def active_jobs(queue: JobQueue, who: Principal) -> int:
    """How many of the key's jobs are unfinished (finished ones are dropped from the active set on the way)."""
    key = queue.settings.key(constants.OWNER_ACTIVE_KEY, key_id=who.key_id)
    job_ids: list[str] = sorted(str(j) for j in queue.redis.smembers(key))  # type: ignore[union-attr]
    if not job_ids:
        return 0
    with queue.redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(queue.job_key(job_id), "state")
        states = pipe.execute()
    finished = [j for j, s in zip(job_ids, states, strict=True) if s is None or s in constants.TERMINAL_STATES]
    if finished:
        queue.redis.srem(key, *finished)
    return len(job_ids) - len(finished)


def authorize(request: Request) -> None:
    """Route dependency: a `slide_id` or `job_id` in the path must belong to the caller's key (404 otherwise)."""
    who = principal_of(request)
    params: dict[str, Any] = request.path_params
    if not who.authenticated or not ("slide_id" in params or "job_id" in params):
        return
    queue: JobQueue = request.app.state.queue
    slide_id = params.get("slide_id")
    if slide_id is not None and not owns_slide(queue, who, str(slide_id)):
        raise SlideNotFound(f"no slide {slide_id}; upload it with POST /v1/slides")
    job_id = params.get("job_id")
    if job_id is not None:
        owner = queue.redis.hget(queue.job_key(str(job_id)), "owner")
        if owner != who.key_id:
            raise JobNotFound(f"no job {job_id!r}; list your jobs with GET /v1/jobs")
