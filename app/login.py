"""The --auth login, throttled per client address: Gradio's /login takes unlimited guesses, so
after a few failures from one address each further try from it waits a growing delay.

Gradio calls the `auth(username, password)` callable without the request, so a small ASGI
middleware in front of its routes finds the client address, refuses a locked-out address with a
429 before Gradio sees the request, and hands the address to `auth` in a context variable."""

from __future__ import annotations

import contextvars
import hmac
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from starlette.middleware import Middleware
from starlette.responses import JSONResponse

log = logging.getLogger("app.login")

FREE_FAILURES = 5  # typos are allowed; a guesser is slowed down from the 5th failure on
MAX_DELAY_S = 300.0
FORGET_AFTER_S = 3600.0  # an address that stopped failing an hour ago starts afresh
MAX_ADDRESSES = 10_000  # an address flood evicts the oldest entries instead of filling memory

# The address of the /login request being handled, set by the middleware for `auth`.
client_address = contextvars.ContextVar("client_address", default="unknown")


@dataclass
class _Failures:
    count: int = 0
    locked_until: float = 0.0
    last_seen: float = 0.0


class LoginThrottle:
    """Failed logins per address. After FREE_FAILURES failures in a row the address is locked for
    base_delay_s, doubling with each further failure up to MAX_DELAY_S; a success forgets it."""

    def __init__(self, base_delay_s: float = 1.0, clock=time.monotonic):
        self.base_delay_s = base_delay_s
        self.clock = clock  # injectable, so tests need not sleep
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, _Failures] = OrderedDict()  # least recently failed first

    def wait_s(self, address: str) -> float:
        """Seconds until `address` may try again; 0 if it may now."""
        with self._lock:
            entry = self._failures.get(address)
            return max(0.0, entry.locked_until - self.clock()) if entry else 0.0

    def attempt(self, address: str, username: str, correct: bool) -> bool:
        """Record one login attempt whose credentials were `correct` or not; True if it logs in.
        A locked-out address is refused even with the right password, and that try is not
        counted, so a user who waits out the delay is not punished for retrying early."""
        with self._lock:
            now = self.clock()
            self._forget_idle(now)
            entry = self._failures.get(address)
            if entry and entry.locked_until > now:
                return False  # raced past the middleware's check with other tries in flight
            if correct:
                self._failures.pop(address, None)
                return True
            entry = entry or _Failures()
            entry.count += 1
            entry.last_seen = now
            if entry.count >= FREE_FAILURES:
                doublings = entry.count - FREE_FAILURES
                delay = self.base_delay_s * 2 ** min(doublings, 32)
                entry.locked_until = now + min(delay, MAX_DELAY_S)
            self._failures[address] = entry
            self._failures.move_to_end(address)
            while len(self._failures) > MAX_ADDRESSES:
                self._failures.popitem(last=False)
            count = entry.count
        # The user name is quoted (repr) so a crafted one cannot forge log lines; the password is
        # never logged.
        log.warning("Failed login for user %r from %s (%d in a row)",
                    username[:100], address, count)
        return False

    def _forget_idle(self, now: float) -> None:
        while self._failures:
            oldest = next(iter(self._failures.values()))
            if now - oldest.last_seen < FORGET_AFTER_S:
                break
            self._failures.popitem(last=False)

    def __len__(self) -> int:
        return len(self._failures)


def refusal(wait_s: float) -> str:
    return f"Too many failed logins from this address: try again in {math.ceil(wait_s)} s"


class ThrottleLoginMiddleware:
    """Answers POST /login from a locked-out address with a 429 and the delay; lets any other
    request through, with the client address of a /login set for `auth`."""

    def __init__(self, app, throttle: LoginThrottle):
        self.app = app
        self.throttle = throttle

    async def __call__(self, scope, receive, send):
        is_login = scope["type"] == "http" and scope["method"] == "POST" \
            and scope["path"].rstrip("/") == "/login"
        if not is_login:
            await self.app(scope, receive, send)
            return
        # The TCP peer (uvicorn only rewrites it from X-Forwarded-For for a proxy on this machine),
        # never a header an outside client can forge.
        address = scope["client"][0] if scope.get("client") else "unknown"
        wait = self.throttle.wait_s(address)
        if wait:
            response = JSONResponse({"detail": refusal(wait)}, status_code=429,
                                    headers={"Retry-After": str(math.ceil(wait))})
            await response(scope, receive, send)
            return
        token = client_address.set(address)
        try:
            await self.app(scope, receive, send)
        finally:
            client_address.reset(token)


def throttled_login(user: str, password: str, throttle: LoginThrottle | None = None):
    """Gradio's `auth` callable for one user:password and the `app_kwargs` that install the
    middleware, for `launch(auth=..., app_kwargs=...)`."""
    if throttle is None:
        # Tests shorten the delay; a user has no reason to.
        throttle = LoginThrottle(base_delay_s=float(os.environ.get("QLS_LOGIN_DELAY_S", "1")))

    def auth(username: str, given_password: str) -> bool:
        # Both compared in constant time, and both always, so timing does not tell which was wrong.
        correct = hmac.compare_digest(username.encode(), user.encode())
        correct &= hmac.compare_digest(given_password.encode(), password.encode())
        return throttle.attempt(client_address.get(), username, correct)

    return auth, {"middleware": [Middleware(ThrottleLoginMiddleware, throttle=throttle)]}
