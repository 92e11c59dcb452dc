"""The engines behind the router: who they are, whether they serve, and how busy they are.

An engine's `/metrics` also carries what its kvcache connector binds into chunk keys
(`kvcache:chunk_namespace_info`, without the tenant salt, which the router has from the operator),
and its `/v1/models` the names it serves (LoRA adapters among them): read on every scrape, so the
router asks the cache cluster for exactly the chunks that engine could load, and sends a request
only to engines that serve its model.

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
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from kvcache.core.keys import EngineKeySettings

log = logging.getLogger(__name__)

_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
_NAMESPACE_INFO = "kvcache:chunk_namespace_info"  # kvcache.connector.vllm.NamespaceInfo
_PARSED = (_RUNNING, _WAITING, _NAMESPACE_INFO)


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
    tenant_salt: str = field(default="", repr=False)  # the operator's, for its namespace
    keys: EngineKeySettings | None = None  # None: no kvcache connector published its settings
    models: dict[str, str] = field(default_factory=dict)  # served name -> LoRA adapter ("" base)
    model_cards: list[dict[str, Any]] = field(default_factory=list)  # its /v1/models entries
    key_problem: str = ""  # why its published key settings were refused
    dp_rank: int | None = None  # one data-parallel rank of a pod's engine (its own KV cache)

    @property
    def headers(self) -> dict[str, str]:
        """What a request to it carries: vLLM sends a request with this header to that rank."""
        return {} if self.dp_rank is None else {"X-data-parallel-rank": str(self.dp_rank)}

    def serves(self, model: object) -> bool:
        """Whether a request for `model` may go here (an engine whose list is not known yet,
        or a request that names no model, is not refused)."""
        return not self.models or not isinstance(model, str) or model in self.models

    @property
    def load(self) -> float:
        return max(float(self.in_flight), self.running + self.waiting)


@dataclass(frozen=True)
class HealthSettings:
    interval_s: float = 1.0
    timeout_s: float = 1.0
    unhealthy_after: int = 2  # failed scrapes in a row


@dataclass(frozen=True)
class EngineMetrics:
    running: float
    waiting: float
    key_labels: dict[str, str] | None  # the connector's published key settings


def parse_metrics(metrics_text: str, dp_rank: int | None = None) -> EngineMetrics:
    """Running and waiting summed over the engine's label sets (one per model, DP rank, ...),
    or of one data-parallel rank's (vLLM labels them `engine="<rank>"`), and the labels of the
    connector's key settings.

    Only those lines are parsed: vLLM's page holds ~40 KB of histograms, which Prometheus'
    Python parser takes ~7 ms to read, on the event loop every request waits on."""
    totals = {_RUNNING: 0.0, _WAITING: 0.0}
    key_labels = None
    lines = [line for line in metrics_text.splitlines() if line.startswith(_PARSED)]
    rank = None if dp_rank is None else str(dp_rank)
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            if sample.name in totals and rank in (None, sample.labels.get("engine")):
                totals[sample.name] += sample.value
            elif sample.name == _NAMESPACE_INFO and sample.value == 1:
                key_labels = dict(sample.labels)
    return EngineMetrics(totals[_RUNNING], totals[_WAITING], key_labels)


def model_cards(listing: Any) -> list[dict[str, Any]]:
    """The model cards of a `/v1/models` answer."""
    cards = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(cards, list):
        raise ValueError("a /v1/models answer without a data list")
    return [card for card in cards if isinstance(card, dict) and isinstance(card.get("id"), str)]


def served_models(cards: list[dict[str, Any]]) -> dict[str, str]:
    """Each served name, and for a LoRA adapter's card (vLLM names its base model as `parent`)
    the adapter, which its requests' KV is computed with."""
    return {card["id"]: card["id"] if card.get("parent") else "" for card in cards}


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
            known = self.engines.get(name)
            if known is not None and known.url == engine.url:
                if known.tenant_salt != engine.tenant_salt:
                    known.tenant_salt, known.keys = engine.tenant_salt, None  # next scrape
                fresh[name] = known
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
                found = parse_metrics(await response.text(), engine.dp_rank)
            engine.running, engine.waiting = found.running, found.waiting
            self._learn_keys(engine, found.key_labels)
            async with session.get(f"{engine.url}/v1/models", timeout=timeout) as response:
                response.raise_for_status()
                engine.model_cards = model_cards(await response.json(content_type=None))
            engine.models = served_models(engine.model_cards)
        except (TimeoutError, aiohttp.ClientError, ValueError) as error:
            engine.failed_scrapes += 1
            if engine.failed_scrapes >= self.settings.unhealthy_after:
                self._down(engine, str(error) or type(error).__name__)
            return
        if not engine.healthy:
            log.info("engine %s is back in the rotation", engine.name)
        engine.failed_scrapes = 0
        engine.healthy = True

    @staticmethod
    def _learn_keys(engine: Engine, labels: dict[str, str] | None) -> None:
        try:
            keys = None if labels is None else EngineKeySettings.from_published(
                labels, engine.tenant_salt)  # fmt: skip
        except ValueError as error:
            keys = None
            if engine.keys is not None or not engine.key_problem:
                log.warning("engine %s: %s; not asking the cluster for it", engine.name, error)
            engine.key_problem = str(error)
        else:
            engine.key_problem = ""
            if keys is not None and keys != engine.keys:
                log.info("engine %s keys chunks as %s", engine.name, keys)
        engine.keys = keys

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
