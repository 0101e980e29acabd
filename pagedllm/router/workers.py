"""``WorkerPool``: the ``pagedllm serve`` processes behind the standalone router, and which of
them are up.

A worker is in rotation while it is healthy. Health is learnt two ways: a background task asks
every worker's ``GET /health`` each ``health_check_interval`` seconds (200 = healthy; anything
else, or no answer within ``health_check_timeout``, = unhealthy), and a request that cannot
reach a worker (connection refused or reset, no response) marks it unhealthy at once, so the
next request does not try it again. A worker that comes back passes the next health check and
re-enters rotation; its routing tree starts empty (its cache is cold anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import httpx

from pagedllm.router.policies import Router

logger = logging.getLogger(__name__)


@dataclass
class Worker:
    """One worker URL and what the router knows of it."""

    url: str
    healthy: bool = False
    failures: int = 0  # health checks or requests failed in a row
    last_error: str | None = None


class WorkerPool:
    """The workers, their health and the ``Router`` that spreads requests over the healthy
    ones. ``start()`` checks every worker once and starts the health loop; ``stop()`` ends it."""

    def __init__(
        self,
        urls: list[str],
        router: Router,
        client: httpx.AsyncClient,
        *,
        health_check_interval: float = 5.0,
        health_check_timeout: float = 2.0,
    ) -> None:
        if not urls:
            raise ValueError("The router needs at least one worker URL.")
        self.workers = {u: Worker(u) for u in (u.rstrip("/") for u in urls)}
        if len(self.workers) != len(urls):
            raise ValueError("A worker URL is listed twice.")
        self.router = router
        self.client = client
        self.interval = health_check_interval
        self.timeout = health_check_timeout
        self._task: asyncio.Task[None] | None = None

    def healthy(self) -> list[str]:
        return [w.url for w in self.workers.values() if w.healthy]

    async def start(self) -> None:
        await self.check_all()
        self._task = asyncio.create_task(self._loop(), name="pagedllm-router-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(w) for w in self.workers.values()))

    def mark_down(self, url: str, error: str) -> None:
        """A request could not reach ``url``: out of rotation until a health check passes."""
        w = self.workers[url]
        w.failures += 1
        w.last_error = error
        if w.healthy:
            logger.warning("Worker %s is down (%s); removed from rotation.", url, error)
            w.healthy = False
            self.router.remove(url)

    def mark_up(self, url: str) -> None:
        w = self.workers[url]
        w.failures = 0
        w.last_error = None
        if not w.healthy:
            logger.info("Worker %s is healthy; in rotation.", url)
            w.healthy = True
            self.router.add(url)

    async def _check(self, w: Worker) -> None:
        try:
            r = await self.client.get(f"{w.url}/health", timeout=self.timeout)
        except httpx.HTTPError as e:
            self.mark_down(w.url, f"health check: {type(e).__name__}: {e}")
            return
        if r.status_code == 200:
            self.mark_up(w.url)
        else:
            self.mark_down(w.url, f"health check: HTTP {r.status_code}")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_all()
            except Exception:  # never let the loop die: the pool would freeze as it is
                logger.exception("Health check round failed")
