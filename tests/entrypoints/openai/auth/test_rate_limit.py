"""``auth/rate_limit.py``: the sliding-minute request and token limits, on a fake clock."""

from __future__ import annotations

import pytest

from pagedllm.entrypoints.openai.auth import RateLimiter
from pagedllm.entrypoints.openai.errors import APIError


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limited(limiter: RateLimiter, subject: str) -> APIError:
    with pytest.raises(APIError) as info:
        limiter.check(subject)
    err = info.value
    assert err.status_code == 429
    assert err.code == "rate_limit_exceeded"
    assert err.type == "rate_limit_error"
    assert err.headers == {"Retry-After": str(err.retry_after)}
    return err


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="requests_per_minute"):
        RateLimiter(0, None)
    with pytest.raises(ValueError, match="tokens_per_minute"):
        RateLimiter(None, -5)


def test_n_requests_pass_and_the_next_is_refused_until_retry_after() -> None:
    clock = FakeClock()
    limiter = RateLimiter(3, None, clock=clock)
    for _ in range(3):
        limiter.check("key:a")
    clock.now += 10
    err = limited(limiter, "key:a")
    assert 50 <= err.retry_after <= 51
    assert "3 requests per minute" in err.message
    limiter.check("key:b")  # other subjects are unaffected
    clock.now += err.retry_after - 1
    assert limited(limiter, "key:a").retry_after == 1
    clock.now += 1
    limiter.check("key:a")


def test_the_window_slides() -> None:
    clock = FakeClock()
    limiter = RateLimiter(3, None, clock=clock)
    limiter.check("s")
    limiter.check("s")
    clock.now += 30
    limiter.check("s")
    limited(limiter, "s")
    clock.now += 31  # the first two have left the window, the third has not
    limiter.check("s")
    limiter.check("s")
    err = limited(limiter, "s")
    assert 1 <= err.retry_after <= 30


def test_no_rolling_minute_holds_more_than_the_limit() -> None:
    clock = FakeClock(1000.9)  # late in its second: the bucket still counts until 1061
    limiter = RateLimiter(1, None, clock=clock)
    limiter.check("s")
    clock.now = 1060.95  # 60.05 s later, but within 61 s of the bucket's start
    limited(limiter, "s")
    clock.now = 1061.0
    limiter.check("s")


def test_token_limit_applies_after_charge() -> None:
    clock = FakeClock()
    limiter = RateLimiter(None, 100, clock=clock)
    limiter.check("s")
    limiter.charge("s", 60)
    limiter.check("s")
    limiter.charge("s", 40)
    err = limited(limiter, "s")
    assert "100 tokens per minute (100 used)" in err.message
    assert err.retry_after >= 1
    clock.now += err.retry_after
    limiter.check("s")


def test_charge_without_a_token_limit_records_nothing() -> None:
    limiter = RateLimiter(5, None, clock=FakeClock())
    limiter.charge("s", 1000)
    assert len(limiter) == 0


def test_both_limits_exceeded_waits_for_the_later() -> None:
    clock = FakeClock()
    limiter = RateLimiter(2, 50, clock=clock)
    limiter.check("s")
    clock.now += 20
    limiter.check("s")
    limiter.charge("s", 50)
    err = limited(limiter, "s")
    assert "2 requests per minute" in err.message and "50 tokens per minute" in err.message
    assert 60 <= err.retry_after <= 61  # the tokens, charged 20 s after the first request


def test_refused_requests_are_not_counted() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1, None, clock=clock)
    limiter.check("s")
    for _ in range(50):
        clock.now += 1
        limited(limiter, "s")
    clock.now += 11  # 61 s after the only admitted request
    limiter.check("s")


def test_idle_subjects_are_forgotten() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, 1000, clock=clock)
    for i in range(1000):
        limiter.check(f"jwt:user-{i}")
        limiter.charge(f"jwt:user-{i}", 5)
    assert len(limiter) == 1000
    clock.now += 62
    limiter.prune()
    assert len(limiter) == 0
    assert limiter._windows == {}


def test_a_flood_of_subjects_does_not_accumulate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, None, clock=clock)
    for i in range(10_000):
        clock.now += 0.1
        limiter.check(f"key:{i}")
    # Only subjects seen in the last window (plus one sweep interval) are kept.
    assert len(limiter) <= (61 + RateLimiter.SWEEP_INTERVAL_S) / 0.1 + 1
