"""Access control of the Serve app: API keys on every route, sessions owned by keys, per-key limits, the audit log.

- ``AccessMiddleware`` (ASGI, on the Ingress's FastAPI app) asks every request but ``OPEN`` ones (``/healthz``,
  ``/readyz``, the web page's shell ``/`` and ``/static/``, ``/auth/``, ``/auth/token``, the API docs) for a key:
  ``Authorization: Bearer NAME.SECRET`` or ``X-API-Key: NAME.SECRET``. Missing, wrong or revoked: 401 with
  ``WWW-Authenticate: Bearer`` and the reason; a key over ``requests_per_minute_per_key`` (a token bucket of one
  minute's requests): 429 with ``Retry-After``; repeated bad keys from one client address: 429 too (each wrong key
  costs an scrypt). Keys are checked against the keys file (``keys.KeyRing``: re-read when it changes, so a revoked
  key is refused from its next request on). The key and the token are never logged or echoed.
- Sessions belong to the key that opened them: ``own(s)`` when one is made, ``check_owner(s)`` on every use (another
  key: 403 naming the session, which is left as it was), ``check_quota(store)`` before one is made
  (``max_sessions_per_key`` live sessions: 429 with ``Retry-After``).
- The audit log (``AuditLog``): one JSON line per request that opened, viewed, changed, exported or closed an image
  or a session, and per refused request: time, key name, action, route template, session id, image id, status.
  Only those fields reach it (ids, never pixels, file contents or patient names); it is its own logger, not
  propagated to Serve's logs. Default file: ``rau_audit.jsonl`` in Serve's log folder.
- CORS: off (no CORS headers) unless ``cors_origins`` lists origins; then Starlette's ``CORSMiddleware`` answers
  them, the preflight included.
- MONAI Label's auth routes (``router``): ``GET /auth/`` ({"enabled", "client_id", "realm"}), ``POST /auth/token``
  (form ``username`` = key name, ``password`` = the secret after the dot, or the whole key) -> {"access_token": the
  key, "token_type": "Bearer"}, ``GET /auth/token/valid``: what ``MONAILabelClient.auth_enabled / auth_token /
  update_auth`` and 3D Slicer's module call.
With keys off (``auth_off_on_loopback``, serve_configs/local.yaml only) every route is open: the Ingress logs a loud
WARNING, sessions have no owner, no limit per key applies; the audit log still records the actions (key ``-``).
Use: ``configure(Policy(...))`` in the Ingress's ``__init__`` (a module of its own, like ``refusal``: Serve ships the
app by value and this module by reference, so the replica's routes read what its Ingress set).
"""

# No ``from __future__ import annotations``: FastAPI reads the /auth/ routes' signatures on the replica (routes.py).
import asyncio
import contextvars
import datetime
import json
import logging
import logging.handlers
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from rau_ray.errors import ConfigError
from rau_ray.serve.http import ApiError
from rau_ray.serve.keys import KeyRing, split_key

log = logging.getLogger("rau_ray.serve")
OPEN = frozenset({"/", "/healthz", "/readyz", "/auth/", "/auth/token", "/docs", "/docs/oauth2-redirect",
                  "/openapi.json", "/favicon.ico"})
REALM = "rau-ray"
# route name -> audit action; the routes named here (and every refused request) are audited
ACTIONS = {"create_session": "open", "ml_create_session": "open", "ml_add_image": "open",
           "get_session": "view", "ml_get_session": "view", "get_image": "view",
           "command": "change", "undo": "change", "redo": "change", "ml_infer": "infer",
           "get_mask": "export", "delete_session": "close", "ml_delete_session": "close",
           "ml_remove_image": "close", "segment": "segment", "label": "label", "pacs_segment": "pacs_segment"}
AUDIT_FIELDS = ("time", "key", "action", "method", "route", "session", "image", "status", "reason")
_ID = re.compile(r"[^A-Za-z0-9_.:/{}\-]")


@dataclass(frozen=True)
class Policy:
    """What ``AppArgs`` says about access: ``keys_file`` None means keys off (loopback development only)."""

    keys_file: str | None = None
    max_sessions_per_key: int = 16
    requests_per_minute_per_key: int = 600
    cors_origins: tuple[str, ...] | None = None
    audit_log: str | None = None
    failed_per_minute_per_client: int = 60


class RateLimiter:
    """Token buckets by name: ``per_minute`` requests a minute, a minute's worth at once. ``take(name)`` -> 0.0
    (allowed) or the seconds until the next request would be."""

    def __init__(self, per_minute: int, clock=time.monotonic, max_names: int = 10_000):
        if per_minute < 1:
            raise ValueError("per_minute must be >= 1")
        self.rate, self.burst, self.clock, self.max_names = per_minute / 60.0, float(per_minute), clock, max_names
        self._buckets: dict[str, tuple[float, float]] = {}

    def _tokens(self, name: str, now: float) -> float:
        tokens, then = self._buckets.get(name, (self.burst, now))
        return min(self.burst, tokens + (now - then) * self.rate)

    def wait(self, name: str) -> float:
        """Seconds until ``name`` may make a request (0.0: now), without taking one."""
        tokens = self._tokens(name, self.clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def take(self, name: str) -> float:
        now = self.clock()
        tokens = self._tokens(name, now)
        if tokens >= 1.0:
            self._buckets[name] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[name] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        if len(self._buckets) > self.max_names:  # forget full buckets (they start full anyway)
            for n in [n for n, (t, s) in self._buckets.items() if t + (now - s) * self.rate >= self.burst]:
                del self._buckets[n]
        return wait


def clean_id(value, limit: int = 256) -> str | None:
    """An id as the audit log keeps it: printable id characters only, bounded."""
    if value is None:
        return None
    return _ID.sub("_", str(value))[:limit]


class AuditLog:
    """JSON lines to ``path`` (mode 0600), through a logger of its own that nothing else writes to or reads from."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        self.logger = logging.getLogger(f"rau_ray.audit.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        handler = logging.handlers.WatchedFileHandler(self.path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        self.logger.addHandler(handler)

    def record(self, *, key: str | None, action: str, method: str, route: str, status: int,
               session: str | None = None, image: str | None = None, reason: str | None = None) -> dict:
        line = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                "key": clean_id(key or "-", 64), "action": clean_id(action, 32), "method": clean_id(method, 8),
                "route": clean_id(route), "session": clean_id(session, 64), "image": clean_id(image),
                "status": int(status), "reason": clean_id(reason, 64)}
        self.logger.info(json.dumps({k: line[k] for k in AUDIT_FIELDS if line[k] is not None}))
        return line

    def close(self) -> None:
        for h in list(self.logger.handlers):
            self.logger.removeHandler(h)
            h.close()


def default_audit_path() -> Path:
    """``rau_audit.jsonl`` in Serve's log folder (Ray's session logs), else in the temp folder."""
    try:
        from ray.serve._private.logging_utils import get_serve_logs_dir  # noqa: PLC0415 - Ray internals, optional

        return Path(get_serve_logs_dir()) / "rau_audit.jsonl"
    except Exception:  # noqa: BLE001 - not on a Ray node, or Ray moved it
        return Path(tempfile.gettempdir()) / "rau-serve" / "rau_audit.jsonl"


class Guard:
    """The Ingress replica's access state: the key ring, the limiters, session owners, the audit log."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.ring = KeyRing(policy.keys_file) if policy.keys_file else None
        if self.ring is not None and not self.ring.active():
            raise ConfigError(f"API keys file {policy.keys_file} has no active key; add one with `rau keys add NAME "
                              f"--file {policy.keys_file}`")
        self.rate = RateLimiter(policy.requests_per_minute_per_key)
        self.failures = RateLimiter(policy.failed_per_minute_per_client)
        self.owners: dict[str, str] = {}
        self.audit = AuditLog(policy.audit_log or default_audit_path())

    @property
    def enabled(self) -> bool:
        return self.ring is not None


_STATE: dict = {}
_REQUEST: contextvars.ContextVar[dict | None] = contextvars.ContextVar("rau_request", default=None)


def configure(policy: Policy) -> Guard:
    """Set this process's access policy (the Ingress's ``__init__``); a keys file without active keys is refused."""
    guard = Guard(policy)
    old = _STATE.get("guard")
    if old is not None:
        old.audit.close()
    _STATE["guard"] = guard
    if guard.enabled:
        log.info("API keys on: %d active key(s) in %s; audit log %s", len(guard.ring.active()), policy.keys_file,
                 guard.audit.path)
    else:
        log.warning("API KEYS ARE OFF (auth_off_on_loopback): EVERY ROUTE IS OPEN to any process that can reach "
                    "this app on 127.0.0.1, sessions have no owner and no per-key limit applies. Never expose this "
                    "app beyond loopback; set api_keys_file (`rau keys add NAME --file PATH`) to turn keys on. "
                    "Audit log: %s", guard.audit.path)
    return guard


def guard() -> Guard | None:
    return _STATE.get("guard")


# ---------------------------------------------------------------------------------------------- what routes call
def current_key() -> str | None:
    ctx = _REQUEST.get()
    return ctx.get("key") if ctx else None


def note(**fields) -> None:
    """Ids for this request's audit line (``session=``, ``image=``)."""
    ctx = _REQUEST.get()
    if ctx is not None:
        ctx.update({k: v for k, v in fields.items() if v is not None})


def own(s) -> None:
    """The session ``s`` was just made by this request's key: it is that key's."""
    g, key = guard(), current_key()
    if g is not None and key is not None:
        g.owners[s.id] = key
    note(session=s.id)


def owner_of(sid: str) -> str | None:
    g = guard()
    return g.owners.get(sid) if g is not None else None


def check_owner(s) -> None:
    """403 naming the session when it belongs to another key than this request's (the session is not touched)."""
    note(session=s.id)
    key, owner = current_key(), owner_of(s.id)
    if key is not None and owner is not None and owner != key:
        raise ApiError(403, f"session {s.id} belongs to another API key; a key may use only the sessions it opened",
                       session_id=s.id)


def may_see(sid: str) -> bool:
    key, owner = current_key(), owner_of(sid)
    return key is None or owner is None or owner == key


def check_quota(store) -> None:
    """429 when this request's key already holds ``max_sessions_per_key`` live sessions."""
    g, key = guard(), current_key()
    if g is None or key is None:
        return
    live = []
    for sid, k in list(g.owners.items()):
        s = store.peek(sid)
        if s is None:
            del g.owners[sid]
        elif k == key:
            live.append(s)
    limit = g.policy.max_sessions_per_key
    if len(live) >= limit:
        oldest = min(s.last_used for s in live)
        wait = max(1, int(store.ttl_s - (store.clock() - oldest)) + 1)
        raise ApiError(429, f"API key {key!r} holds {len(live)} live sessions, its limit ({limit}); close one "
                            f"(DELETE /v1/sessions/ID or /session/ID) or retry in {wait} s",
                       headers={"Retry-After": str(wait)})


# -------------------------------------------------------------------------------------------------- middleware
def _token(headers: dict) -> str | None:
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    value = headers.get("x-api-key", "").strip()
    return value or None


def _answer(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _unauthorized(message: str, error: str = "invalid_token") -> JSONResponse:
    return _answer(401, message, {"WWW-Authenticate": f'Bearer realm="{REALM}", error="{error}"'})


class AccessMiddleware:
    """Keys, per-key rate, the audit line, CORS when configured (see the module's docstring)."""

    def __init__(self, app):
        self.app = app
        self._cors: tuple | None = None  # (origins, CORSMiddleware) built on first use from the replica's policy

    async def __call__(self, scope, receive, send):
        g = guard()
        if scope["type"] != "http" or g is None:
            return await self.app(scope, receive, send)
        origins = g.policy.cors_origins
        if origins:
            if self._cors is None or self._cors[0] != origins:
                self._cors = (origins, CORSMiddleware(
                    self._guarded, allow_origins=list(origins), allow_methods=["*"],
                    allow_headers=["Authorization", "X-API-Key", "Content-Type"],
                    expose_headers=["Retry-After", "Location", "Content-Disposition"], max_age=600))
            return await self._cors[1](scope, receive, send)
        return await self._guarded(scope, receive, send)

    async def _guarded(self, scope, receive, send):
        g = guard()
        root = scope.get("root_path", "") or ""
        path = scope["path"][len(root):] if root and scope["path"].startswith(root) else scope["path"]
        path = path or "/"
        method = scope.get("method", "GET")
        if path in OPEN or path.startswith("/static/") or method == "OPTIONS":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = None
        if g.enabled:
            token = _token(headers)
            client = (scope.get("client") or ("?", 0))[0]
            refused = None
            if token is None:
                refused = _unauthorized("an API key is required: send it as 'Authorization: Bearer <key>' (or "
                                        "'X-API-Key: <key>'); MONAI Label clients: POST /auth/token", "invalid_request")
                reason = "missing key"
            else:
                wait = 0.0 if self._cached_ok(g, token) else g.failures.wait(client)
                if wait:
                    refused = _answer(429, f"too many requests with bad API keys from this address; retry in "
                                           f"{math.ceil(wait)} s", {"Retry-After": str(math.ceil(wait))})
                    reason = "bad keys rate"
                else:
                    verdict = await self._check(g, token)
                    key = verdict.name
                    if not verdict.ok:
                        g.failures.take(client)
                        refused, reason = _unauthorized(verdict.reason), "revoked key" if verdict.name else "bad key"
                    else:
                        wait = g.rate.take(key)
                        if wait:
                            secs = math.ceil(wait)
                            refused = _answer(429, f"API key {key!r} is over its rate "
                                                   f"({g.policy.requests_per_minute_per_key} requests a minute); "
                                                   f"retry in {secs} s", {"Retry-After": str(secs)})
                            reason = "rate"
            if refused is not None:
                g.audit.record(key=key, action="refused", method=method, route=path, status=refused.status_code,
                               reason=reason)
                return await refused(scope, receive, send)
        ctx = {"key": key}
        token_var = _REQUEST.set(ctx)
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            _REQUEST.reset(token_var)
            route = scope.get("route")
            name = getattr(route, "name", None)
            action = ACTIONS.get(name)
            if action is not None or status["code"] in (401, 403, 429):
                q = parse_qs(scope.get("query_string", b"").decode("latin-1"))
                image = ctx.get("image") or (q.get("image") or q.get("id") or [None])[0]
                g.audit.record(key=key, action=action or "refused", method=method,
                               route=getattr(route, "path", path), status=status["code"], session=ctx.get("session"),
                               image=image)

    @staticmethod
    def _cached_ok(g: Guard, token: str) -> bool:
        v = g.ring.cached(token)
        return v is not None and v.ok

    @staticmethod
    async def _check(g: Guard, token: str):
        return await asyncio.to_thread(g.ring.check, token)  # scrypt (~50 ms) off the event loop, once per key


# ---------------------------------------------------------------------------------------- MONAI Label's routes
router = APIRouter(prefix="/auth", tags=["auth"])


@router.get("/", summary="Whether API keys are on (MONAI Label's GET /auth/)")
async def auth_enabled():
    g = guard()
    return {"enabled": bool(g and g.enabled), "client_id": REALM, "realm": None}


@router.post("/token", summary="A bearer token for a key: form username = key name, password = its secret "
                                "(MONAI Label's POST /auth/token)")
async def auth_token(request: Request):
    g = guard()
    if g is None or not g.enabled:
        return {"access_token": None, "token_type": None}
    body = (await request.body())[:4096].decode("utf-8", errors="replace")
    ctype = request.headers.get("content-type", "")
    if "json" in ctype:
        try:
            form = {k: [str(v)] for k, v in json.loads(body).items()}
        except (ValueError, AttributeError):
            raise ApiError(400, "the body must be a form (username, password) or a JSON object of them") from None
    else:
        form = parse_qs(body)
    username, password = (form.get("username") or [""])[0], (form.get("password") or [""])[0]
    if not username or not password:
        raise ApiError(422, "username (the key's name) and password (its secret: the part after the dot) are "
                            "required")
    key = password if split_key(password) and password.split(".", 1)[0] == username else f"{username}.{password}"
    client = request.client.host if request.client else "?"
    wait = g.failures.wait(client)
    if wait:
        raise ApiError(429, f"too many failed logins from this address; retry in {math.ceil(wait)} s",
                       headers={"Retry-After": str(math.ceil(wait))})
    verdict = await asyncio.to_thread(g.ring.check, key)
    if not verdict.ok:
        g.failures.take(client)
    g.audit.record(key=verdict.name or username, action="token", method="POST", route="/auth/token",
                   status=200 if verdict.ok else 401, reason=None if verdict.ok else "login refused")
    if not verdict.ok:
        raise ApiError(401, verdict.reason, headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'})
    return {"access_token": key, "token_type": "Bearer"}


@router.get("/token/valid", summary="The key of this request (401 without a valid one)")
async def auth_token_valid():
    key = current_key()
    return {"username": key, "enabled": key is not None}
