"""The engines behind the router: who they are, whether they serve, and how busy they are.

Load comes from two places: vLLM's own gauges (`vllm:num_requests_running` / `_waiting` on
`/metrics`, scraped every `interval_s`, which also counts requests other router replicas sent) and
the router's in-flight count, which moves at once. The larger of the two is the engine's load, so
a burst between scrapes is seen. An engine that fails `unhealthy_after` scrapes in a row, or any
request, leaves the rotation; one good scrape brings it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
_LOAD_GAUGES = (_RUNNING, _WAITING)


@dataclass
class Engine:
    name: str
    url: str  # base URL, e.g. http://10.0.0.5:8000
    healthy: bool = True
    in_flight: int = 0  # requests this router sent that have not finished
    awaiting_first_token: int = 0  # of those, the ones whose answer has not started
    running: float = 0.0  # from the engine's last scrape
    waiting: float = 0.0
    failed_scrapes: int = 0

    @property
    def load(self) -> float:
        return max(float(self.in_flight), self.running + self.waiting)


@dataclass(frozen=True)
class HealthSettings:
    interval_s: float = 1.0
    timeout_s: float = 1.0
    unhealthy_after: int = 2  # failed scrapes in a row


def parse_load(metrics_text: str) -> tuple[float, float]:
    """(running, waiting) summed over the engine's label sets (one per model, DP rank, ...).

    Only the two gauges' lines are parsed: vLLM's page holds ~40 KB of histograms, which
    Prometheus' Python parser takes ~7 ms to read, on the event loop every request waits on."""
    totals = {_RUNNING: 0.0, _WAITING: 0.0}
    lines = [line for line in metrics_text.splitlines() if line.startswith(_LOAD_GAUGES)]
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals[_RUNNING], totals[_WAITING]


@dataclass
class EnginePool:
    engines: dict[str, Engine] = field(default_factory=dict)
    settings: HealthSettings = field(default_factory=HealthSettings)
    on_down: Callable[[Engine], None] | None = None  # an engine left the rotation

    def _down(self, engine: Engine, reason: object) -> None:
        if engine.healthy:
            log.warning("engine %s (%s) left the rotation: %s", engine.name, engine.url, reason)
            if self.on_down is not None:
                self.on_down(engine)
        engine.healthy = False

    def set_engines(self, engines: Iterable[Engine]) -> None:
        """Replace the member list (discovery), keeping what is known of engines that stay."""
        fresh = {engine.name: engine for engine in engines}
        for name, engine in fresh.items():
            if name in self.engines and self.engines[name].url == engine.url:
                fresh[name] = self.engines[name]
        self.engines = fresh

    def healthy(self) -> list[Engine]:
        return [engine for engine in self.engines.values() if engine.healthy]

    def mark_failed(self, engine: Engine) -> None:
        """A request to it failed: out of the rotation until a scrape succeeds."""
        self._down(engine, "a request failed")
        engine.failed_scrapes = max(engine.failed_scrapes, self.settings.unhealthy_after)

    async def scrape(self, session: aiohttp.ClientSession, engine: Engine) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
        try:
            async with session.get(f"{engine.url}/metrics", timeout=timeout) as response:
                response.raise_for_status()
                engine.running, engine.waiting = parse_load(await response.text())
        except (TimeoutError, aiohttp.ClientError, ValueError) as error:
            engine.failed_scrapes += 1
            if engine.failed_scrapes >= self.settings.unhealthy_after:
                self._down(engine, str(error) or type(error).__name__)
            return
        if not engine.healthy:
            log.info("engine %s is back in the rotation", engine.name)
        engine.failed_scrapes = 0
        engine.healthy = True

    async def watch(self, session: aiohttp.ClientSession) -> None:
        """Scrape every engine every `interval_s`, until cancelled."""
        while True:
            await asyncio.gather(*(self.scrape(session, e) for e in list(self.engines.values())))
            await asyncio.sleep(self.settings.interval_s)


@contextlib.asynccontextmanager
async def watching(pool: EnginePool, session: aiohttp.ClientSession):
    task = asyncio.create_task(pool.watch(session))
    try:
        yield pool
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
