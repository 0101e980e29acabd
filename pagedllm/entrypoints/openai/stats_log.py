"""The periodic engine stats log line of ``serve`` (off with ``--disable-log-stats``).

Operators tail the server's log, not ``/metrics``: every ``--log-stats-interval`` seconds the
server logs the prompt and generation throughput since the previous line, the running and
waiting requests, the KV-cache usage and the prefix-cache hit rate, as vLLM does. An idle
server logs one line when it becomes idle and then stays quiet until work arrives again, so a
quiet log means a quiet server.

``StatsLine`` is the pure part (stats in, a line or None out) so that tests need no clock;
``log_stats_forever`` is the task the app's lifespan runs.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.engine.stats import EngineStats

logger = logging.getLogger("pagedllm.stats")


@dataclass
class StatsLine:
    """Turns successive ``EngineStats`` snapshots into log lines (see the module doc)."""

    _last: EngineStats | None = None
    _last_time: float = 0.0
    _was_idle: bool = field(default=True)

    def line(self, stats: EngineStats, now: float) -> str | None:
        """The line for ``stats`` taken at ``now`` (seconds), or None to stay quiet."""
        last, last_time = self._last, self._last_time
        self._last, self._last_time = stats, now
        if last is None:
            return None
        elapsed = max(now - last_time, 1e-9)
        prompt = stats.prompt_tokens_total - last.prompt_tokens_total
        generated = stats.generation_tokens_total - last.generation_tokens_total
        queries = stats.prefix_cache_queries - last.prefix_cache_queries
        hits = stats.prefix_cache_hits - last.prefix_cache_hits
        idle = not (prompt or generated or stats.num_running or stats.num_waiting)
        if idle and self._was_idle:
            return None
        self._was_idle = idle
        hit_rate = f"{100.0 * hits / queries:.1f}%" if queries else "n/a"
        return (
            f"Engine stats: prompt throughput {prompt / elapsed:.1f} tokens/s, generation "
            f"throughput {generated / elapsed:.1f} tokens/s, running {stats.num_running}, "
            f"waiting {stats.num_waiting}, KV cache usage {100.0 * stats.kv_cache_usage:.1f}%, "
            f"prefix cache hit rate {hit_rate}"
        )


async def log_stats_forever(engine: AsyncLLM, interval: float) -> None:
    """Log ``StatsLine``'s lines every ``interval`` seconds until cancelled."""
    loop = asyncio.get_running_loop()
    stats_line = StatsLine()
    while True:
        if engine.is_running:
            try:
                text = stats_line.line(await engine.get_stats(), loop.time())
            except Exception:  # the stats line never takes the server down
                logger.debug("get_stats failed", exc_info=True)
            else:
                if text is not None:
                    logger.info(text)
        await asyncio.sleep(interval)
