"""Per-subject request and token limits over a sliding minute (``--rate-limit-*``).

Why: one busy tenant (an API key, a JWT subject, or a client address on an open server) must
not starve the others, and cheap in memory however many subjects come and go. The request
limit is exact: no rolling 60 seconds ever admits more requests than the limit. The token
limit is enforced at admission against tokens already charged: the gate (``gate.py``) calls
``check`` before a request runs, and ``serving_base.py`` calls ``charge`` with the request's
prompt and generated tokens when it ends (however it ends), so one request that starts under
the limit may take the subject over it; the next ones wait until the window has room again.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from pagedllm.entrypoints.openai.errors import APIError

RATE_WINDOW_S = 60

# A bucket is [second, requests, tokens]; these index its counters.
_REQUESTS = 1
_TOKENS = 2


def _expiry(second: int) -> float:
    """A bucket for ``[second, second + 1)`` counts until a full window after its end."""
    return second + 1 + RATE_WINDOW_S


class _SubjectWindow:
    """One subject's last minute: ``[second, requests, tokens]`` buckets, oldest first."""

    __slots__ = ("buckets", "requests", "tokens")

    def __init__(self) -> None:
        self.buckets: deque[list[int]] = deque()
        self.requests = 0
        self.tokens = 0

    def expire(self, now: float) -> None:
        """Drop buckets whose every moment is a full window old."""
        while self.buckets and _expiry(self.buckets[0][0]) <= now:
            _, requests, tokens = self.buckets.popleft()
            self.requests -= requests
            self.tokens -= tokens

    def add(self, now: float, requests: int, tokens: int) -> None:
        second = math.floor(now)
        if not self.buckets or self.buckets[-1][0] != second:
            self.buckets.append([second, 0, 0])
        bucket = self.buckets[-1]
        bucket[_REQUESTS] += requests
        bucket[_TOKENS] += tokens
        self.requests += requests
        self.tokens += tokens

    def free_at(self, field: int, limit: int) -> float:
        """When expiring buckets brings the ``field`` total (``_REQUESTS`` or ``_TOKENS``)
        below ``limit``."""
        total = self.requests if field == _REQUESTS else self.tokens
        for bucket in self.buckets:
            total -= bucket[field]
            if total < limit:
                return _expiry(bucket[0])
        return 0.0  # unreachable while total >= limit


class RateLimiter:
    """Per-subject requests and tokens over a sliding 60-second window.

    Each subject's window holds one-second buckets; an event counts until 60 s after the end of
    its second (60 to 61 s), so no rolling 60 s ever holds more than the limit. ``check`` refuses
    a request (429, ``code="rate_limit_exceeded"``, ``retry_after`` seconds on the error and a
    ``Retry-After`` header) when the subject already made ``requests_per_minute`` requests or
    used ``tokens_per_minute`` tokens in the window, and records it otherwise; refused requests
    are not counted. ``charge`` adds a finished request's tokens.

    Memory is bounded: at most 62 buckets per subject, and subjects whose window emptied are
    dropped — their own on each call, all of them in a sweep at most every
    ``SWEEP_INTERVAL_S``. Not thread-safe (the asyncio loop calls it).
    """

    SWEEP_INTERVAL_S = 5.0

    def __init__(
        self,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (
            ("requests_per_minute", requests_per_minute),
            ("tokens_per_minute", tokens_per_minute),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (got {value})")
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self._clock = clock
        self._windows: dict[str, _SubjectWindow] = {}
        self._next_sweep = clock() + self.SWEEP_INTERVAL_S

    def __len__(self) -> int:
        """How many subjects are tracked (memory use)."""
        return len(self._windows)

    def check(self, subject: str) -> None:
        """Admit and record one request of ``subject``, or raise a 429 ``APIError``."""
        now = self._clock()
        window = self._window(subject, now)
        self._refuse_if_over(window, now)
        window.add(now, 1, 0)

    def charge(self, subject: str, tokens: int) -> None:
        """Add a finished request's prompt + completion ``tokens`` to ``subject``'s window."""
        if self.tokens_per_minute is None or tokens <= 0:
            return
        now = self._clock()
        self._window(subject, now).add(now, 0, tokens)

    def prune(self) -> None:
        """Forget every subject whose window is empty now."""
        now = self._clock()
        for subject in list(self._windows):
            self._current(subject, now)
        self._next_sweep = now + self.SWEEP_INTERVAL_S

    def _window(self, subject: str, now: float) -> _SubjectWindow:
        """``subject``'s up-to-date window, made when it has none; sweeps when one is due."""
        if now >= self._next_sweep:
            self.prune()
        window = self._current(subject, now)
        if window is None:
            window = self._windows[subject] = _SubjectWindow()
        return window

    def _current(self, subject: str, now: float) -> _SubjectWindow | None:
        """``subject``'s window with old buckets dropped (None, and forgotten, when empty)."""
        window = self._windows.get(subject)
        if window is None:
            return None
        window.expire(now)
        if not window.buckets:
            del self._windows[subject]
            return None
        return window

    def _refuse_if_over(self, window: _SubjectWindow, now: float) -> None:
        reasons: list[str] = []
        free_at = now
        rpm, tpm = self.requests_per_minute, self.tokens_per_minute
        if rpm is not None and window.requests >= rpm:
            reasons.append(f"{rpm} requests per minute")
            free_at = max(free_at, window.free_at(_REQUESTS, rpm))
        if tpm is not None and window.tokens >= tpm:
            reasons.append(f"{tpm} tokens per minute ({window.tokens} used)")
            free_at = max(free_at, window.free_at(_TOKENS, tpm))
        if not reasons:
            return
        retry_after = max(1, math.ceil(free_at - now))
        err = APIError(
            429,
            f"Rate limit exceeded: {' and '.join(reasons)}; retry after {retry_after} s.",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry_after)},  # sent by APIError.response()
        )
        err.retry_after = retry_after  # type: ignore[attr-defined]  # read by gate.py
        raise err
