"""The routing policy's guards and tie-breaking, on plain values, and one small simulator run that
shows the ordering `benchmarks/routing.py` is there to show."""

from __future__ import annotations

import importlib.util
import random
import sys
from dataclasses import replace
from pathlib import Path

from kvcache.router.score import (
    EngineState,
    RouteRequest,
    ScoreSettings,
    affinity_block,
    choose_engine,
    estimate_cost,
    rank_engines,
)

SETTINGS = ScoreSettings()
BLOCK = 16


def idle(*names: str) -> list[EngineState]:
    return [EngineState(name) for name in names]


def test_a_match_shorter_than_the_minimum_is_no_affinity() -> None:
    request = RouteRequest(prompt_tokens=4000, affinity_key=7)
    short = EngineState("a", gpu_tokens=SETTINGS.min_match_tokens - BLOCK)
    none = EngineState("b")
    assert estimate_cost(request, short, SETTINGS) == estimate_cost(request, none, SETTINGS)
    long = replace(short, gpu_tokens=SETTINGS.min_match_tokens)
    assert estimate_cost(request, long, SETTINGS) < estimate_cost(request, none, SETTINGS)
    assert choose_engine(request, [none, long]) == "a"


def test_a_short_shared_prefix_does_not_pin_new_prefixes() -> None:
    """Engine a holds the system prompt every request starts with; new prompts still spread."""
    shared = SETTINGS.min_match_tokens // 2
    chosen = {
        choose_engine(
            RouteRequest(4000, affinity_key=key),
            [EngineState("a", gpu_tokens=shared), *idle("b", "c", "d")],
        )
        for key in range(32)
    }
    assert chosen == {"a", "b", "c", "d"}


def test_the_imbalance_guard_moves_a_hot_prefix_off_a_busy_engine() -> None:
    request = RouteRequest(prompt_tokens=8000, affinity_key=1)
    hot = EngineState("hot", gpu_tokens=8000, running=30)
    cold = EngineState("cold", running=5)
    assert estimate_cost(request, hot, SETTINGS) < estimate_cost(request, cold, SETTINGS)
    ranking = rank_engines(request, [hot, cold])
    assert [c.name for c in ranking] == ["cold", "hot"]
    assert not ranking[1].balanced
    # within the guard's slack the prefix wins
    assert choose_engine(request, [replace(hot, running=12), cold]) == "hot"


def test_an_idle_engine_is_put_to_work_before_a_long_shared_prefix_pins_the_rest() -> None:
    """A 6K-token system prompt is on three busy engines; the fourth must load it first."""
    request = RouteRequest(prompt_tokens=6500, affinity_key=3)
    busy = [EngineState(name, gpu_tokens=6144, cluster_tokens=6144, running=9) for name in "abc"]
    fresh = EngineState("d", cluster_tokens=6144)
    assert choose_engine(request, [*busy, fresh]) == "d"


def place_prompt_groups(names: list[str], rounds: int = 5) -> dict[int, set[str]]:
    """Where each of 8 prompt groups (a 1K-token system prompt each, then a question) goes when
    their requests come one at a time to idle engines whose index learns each routed prompt."""
    rng = random.Random(5)
    systems = [[rng.getrandbits(64) for _ in range(64)] for _ in range(8)]
    held: dict[str, set[int]] = {name: set() for name in names}
    placed: dict[int, set[str]] = {group: set() for group in range(len(systems))}
    for _ in range(rounds):
        for group, system in enumerate(systems):
            blocks = system + [rng.getrandbits(64) for _ in range(4)]
            engines = [
                EngineState(
                    name,
                    gpu_tokens=BLOCK * len(system) if group in held[name] else 0,
                    cached_blocks=len(held[name]) * len(system),
                )
                for name in names
            ]
            key = affinity_block(blocks, BLOCK, SETTINGS)
            chosen = choose_engine(RouteRequest(BLOCK * len(blocks), key), engines)
            held[chosen].add(group)
            placed[group].add(chosen)
    return placed


def test_new_prefixes_spread_over_idle_engines_and_each_keeps_its_engine() -> None:
    names = ["e0", "e1", "e2", "e3"]
    placed = place_prompt_groups(names)
    assert all(len(engines) == 1 for engines in placed.values())
    assert set().union(*placed.values()) == set(names)
    assert place_prompt_groups(["e3", "e1", "e0", "e2"]) == placed  # the listing order is moot


def test_ties_do_not_go_to_the_first_engine_listed() -> None:
    winners = {
        choose_engine(RouteRequest(2000, affinity_key=key), idle("a", "b", "c", "d"))
        for key in range(64)
    }
    assert winners == {"a", "b", "c", "d"}


def test_unhealthy_engines_are_never_chosen() -> None:
    request = RouteRequest(prompt_tokens=4000, affinity_key=9)
    sick = EngineState("sick", gpu_tokens=4000, healthy=False)
    well = EngineState("well", running=40)
    assert choose_engine(request, [sick, well]) == "well"
    assert [c.name for c in rank_engines(request, [sick, well])] == ["well"]
    assert choose_engine(request, [sick]) is None
    assert rank_engines(request, []) == []


def test_the_ranking_orders_retries_by_cost() -> None:
    request = RouteRequest(prompt_tokens=4000, affinity_key=11)
    engines = [
        EngineState("loadable", cluster_tokens=4000),
        EngineState("cold"),
        EngineState("cached", gpu_tokens=4000),
        EngineState("cached-busy", gpu_tokens=4000, awaiting_first_token=4, running=4),
    ]
    ranking = rank_engines(request, engines)
    assert [c.name for c in ranking] == ["cached", "loadable", "cached-busy", "cold"]
    assert [c.cost_s for c in ranking] == sorted(c.cost_s for c in ranking)


def test_the_routers_own_count_covers_a_stale_scrape() -> None:
    stale = EngineState("stale", running=0, waiting=0, in_flight=6, awaiting_first_token=6)
    assert stale.load == 6 and stale.queued == 6
    other_routers = EngineState("shared", running=2, waiting=5, in_flight=1, awaiting_first_token=1)
    assert other_routers.load == 7 and other_routers.queued == 5


def load_routing_benchmark():
    path = Path(__file__).parents[2] / "benchmarks" / "routing.py"
    spec = importlib.util.spec_from_file_location("routing_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's annotations through it
    spec.loader.exec_module(module)
    return module


def test_simulated_chat_kvcache_beats_every_peer_with_balanced_load() -> None:
    """A quarter of the benchmark's chat trace on 8 engines with a quarter of the cache."""
    routing = load_routing_benchmark()
    requests = routing.chat_trace(routing.ChatTrace(conversations=400, start_window_s=75.0), 1)
    results = {
        r.policy: r
        for r in routing.compare("chat", requests, 8, routing.EngineModel(cache_blocks=8192), 1)
    }
    ours, oracle = results.pop("kvcache"), results.pop("oracle")
    results.pop("kvcache-gpu")
    assert ours.reused_tokens >= 0.95 * oracle.reused_tokens
    assert ours.max_mean_load <= 1.15
    assert all(ours.mean_ttft_s < peer.mean_ttft_s for peer in results.values()), {
        name: r.mean_ttft_s for name, r in results.items()
    }
    # prefix-aware routing beats spreading by load alone by far
    assert results["sglang"].mean_ttft_s < results["least-load"].mean_ttft_s / 4
