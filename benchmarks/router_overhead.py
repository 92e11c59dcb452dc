"""What a router costs in front of instant engines: kvcache's router against vllm-router and
sglang-router, in one run, on loopback.

    .venv/bin/python benchmarks/router_overhead.py [--duration 15] [--closed-duration 10]
        [--rate 200] [--clients 32] [--targets all] [--out benchmarks/results/router_overhead.json]

Four fake engines (`kvcache.testing.fake_engine`, separate processes, 8 SSE chunks per answer, no
delay) stand for vLLM; each target runs on freshly started ones, so its engines start idle. The
targets: the direct connection (this client to one engine, and round-robin over the engines),
kvcache's router (its policy, routing by text, and by vLLM block hashes with SmolLM2's tokenizer),
vllm-router (round_robin, cache_aware) and sglang-router (round_robin, cache_aware), each its own
process with its defaults but for `--host 127.0.0.1 --prometheus-host 127.0.0.1`.

Workload: streamed chat requests (`stream: true`) of ~4K characters, each one of 8 system prompts
(the groups) and a short user message that varies. Per target, on its own fresh engines:
1. warm-up: one request per group, one at a time, then a second of open loop (not timed, but its
   routing counts for the groups);
2. `--rounds` rounds of two open loops, each `--rate` requests/s (Poisson arrivals, or fixed
   intervals) for `--duration` s from an asyncio aiohttp client (this process; the routers run in
   their own): first sent directly to the engines, round-robin (the baseline), then through the
   target. The machine is shared and its load drifts, so each round's added latency is the
   target's percentile minus the baseline's of the same round, and a row gives the median over
   the rounds (every round's figure is in the JSON). Latency is from sending the request to the
   last byte of the stream (and to its first byte). The router's CPU (utime + stime of its process
   and children, /proc) over its open loops divided by the requests; the engines' likewise (a
   router that asks the engines to tokenize moves work there);
3. closed loop: `--clients` clients, each sending its next request when the last one ended, for
   `--closed-duration` s: the requests/s completed.
Groups: every answer names its engine (`system_fingerprint`). A group's home is the engine that
served most of its requests in phases 2-3; `groups_spread` says whether every engine is home to
a group and every request of every group went to its home; `group_stickiness` is the share of
requests served at home.

The whole-path microbenchmark (`path_p99_ms`) times `PrefixPolicy.rank` as the router calls it for
a 4K-token chat prompt: the chat template and SmolLM2's tokenizer, vLLM's block hashes (16-token
blocks, sha256_cbor), the prefix index lookup (100k blocks over 64 engines, the prompt's system
part held by every engine and the whole prompt by one) and the score. The decision row of
`benchmarks/results/router_decision.json` is appended when that file exists.

Everything shares the machine's cores: clients, routers and engines. Compare rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from kvcache.demo.workload import text

ENGINE_CHUNKS = 8
FINGERPRINT = re.compile(rb'"system_fingerprint":\s*"([^"]*)"')
JSON_HEADERS = {"content-type": "application/json"}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROSE = ("handbook.md", "fernlight.md", "observatory.md", "sourdough.md")
WORDS = (  # the user messages
    "cache prefix engine router block token request prompt model answer system user context "
    "memory latency throughput batch schedule queue stream chunk index policy score load "
    "balance reuse prefill decode layer head attention key value tensor page pool node cluster "
    "replica shard region zone network socket buffer copy compress encode hash table tree"
).split()


# --- the workload -------------------------------------------------------------------------------


def system_prompt(group: int, groups: int, chars: int) -> str:
    """A group's system prompt, `chars` long and distinct from its first characters: real prose
    (the demo's four texts, read round from a different place for each group), so a chat template
    and a real tokenizer see ~4.4 characters per token, as in English text."""
    corpus = "\n\n".join(text(name) for name in PROSE)
    start = group * len(corpus) // groups
    header = f"You are assistant {group} of the fleet. Answer from this text only.\n\n"
    body = (corpus[start:] + "\n\n" + corpus)[: chars - len(header)]
    return header + body


@dataclass
class Workload:
    """Pre-serialized request bodies (the client must stay cheap), each tagged with its group."""

    bodies: list[tuple[int, bytes]]
    _next: int = 0

    @classmethod
    def build(cls, seed: int, groups: int, system_chars: int, count: int = 4096) -> Workload:
        rng = random.Random(seed)
        prompts = [system_prompt(group, groups, system_chars) for group in range(groups)]
        bodies = []
        for number in range(count):
            group = rng.randrange(groups)
            question = f"Question {number}: " + " ".join(rng.choices(WORDS, k=rng.randint(6, 14)))
            payload = {
                "model": "fake",
                "messages": [
                    {"role": "system", "content": prompts[group]},
                    {"role": "user", "content": question + "?"},
                ],
                "max_tokens": ENGINE_CHUNKS,
                "stream": True,
            }
            bodies.append((group, json.dumps(payload).encode()))
        return cls(bodies)

    def take(self) -> tuple[int, bytes]:
        body = self.bodies[self._next % len(self.bodies)]
        self._next += 1
        return body


# --- processes ----------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def cpu_s(self) -> float:
        """CPU seconds of the process and its descendants (live, and reaped by them)."""
        total, pending = 0, [self.popen.pid]
        while pending:
            pid = pending.pop()
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += sum(int(stat[index]) for index in (11, 12, 13, 14))
                for task in Path(f"/proc/{pid}/task").iterdir():
                    pending += [int(child) for child in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
        return total / CLOCK_TICKS

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


def start(name: str, command: list[str], workdir: Path) -> Process:
    log = workdir / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
    return Process(name, popen, log)


def log_tail(process: Process, lines: int = 15) -> str:
    text = process.log.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(re.sub(r"\x1b\[[0-9;]*m", "", line)[:300] for line in text)


@dataclass
class Fleet:
    """The fake engines of one target."""

    engines: list[Process]
    urls: dict[str, str]  # name -> base URL

    def cpu_s(self) -> float:
        return sum(engine.cpu_s() for engine in self.engines)

    def stop(self) -> None:
        for engine in self.engines:
            engine.stop()


async def wait_until(check: Callable[[], object], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if await check():
                return
        except (aiohttp.ClientError, OSError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")
        await asyncio.sleep(0.2)


async def start_fleet(
    session: aiohttp.ClientSession, count: int, tokenizer_dir: Path, workdir: Path
) -> Fleet:
    ports = free_ports(count)
    engines, urls = [], {}
    for index, port in enumerate(ports):
        name = f"e{index}"
        command = [sys.executable, "-m", "kvcache.testing.fake_engine", "--port", str(port),
                   "--name", name, "--chunks", str(ENGINE_CHUNKS), "--chunk-delay-s", "0",
                   "--model-path", str(tokenizer_dir)]  # fmt: skip
        engines.append(start(f"engine-{name}", command, workdir))
        urls[name] = f"http://127.0.0.1:{port}"
    fleet = Fleet(engines, urls)
    for url in urls.values():

        async def healthy(url: str = url) -> bool:
            async with session.get(f"{url}/health") as response:
                return response.status == 200

        await wait_until(healthy, f"engine {url}", 60)
    return fleet


# --- targets ------------------------------------------------------------------------------------


Command = Callable[[int, int, dict[str, str], Path], list[str]]


@dataclass(frozen=True)
class Target:
    key: str
    router: str
    policy: str
    # (router port, prometheus port, engine URLs by name, tokenizer dir) -> command; None: direct
    command: Command | None = None
    direct_engines: int = 0  # direct targets: how many engines the client spreads over


def _kvcache(tokens: bool) -> Command:
    def command(port: int, _: int, urls: dict[str, str], tokenizer_dir: Path) -> list[str]:
        engines = [arg for name, url in urls.items() for arg in ("--engine", f"{name}={url}")]
        extra = ["--tokenizer", str(tokenizer_dir)] if tokens else []
        return [sys.executable, "-m", "kvcache", "router", "--host", "127.0.0.1",
                "--port", str(port), *engines, *extra]  # fmt: skip

    return command


def _peer(launcher: list[str], policy: str) -> Command:
    def command(port: int, metrics: int, urls: dict[str, str], _: Path) -> list[str]:
        return [*launcher, "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics),
                "--worker-urls", *urls.values()]  # fmt: skip

    return command


def targets() -> list[Target]:
    vllm_router = shutil.which("vllm-router", path=str(Path(sys.executable).parent))
    sglang = [sys.executable, "-m", "sglang_router.launch_router"]
    found = [
        Target("direct-one", "direct", "one_engine", direct_engines=1),
        Target("direct-rr", "direct", "round_robin", direct_engines=0),
        Target("kvcache-text", "kvcache", "prefix_text", _kvcache(False)),
        Target("kvcache-tokens", "kvcache", "prefix_tokens", _kvcache(True)),
    ]
    if vllm_router:
        found += [
            Target("vllm-rr", "vllm-router", "round_robin", _peer([vllm_router], "round_robin")),
            Target("vllm-cache", "vllm-router", "cache_aware", _peer([vllm_router], "cache_aware")),
        ]
    if importlib.util.find_spec("sglang_router") is not None:
        found += [
            Target("sglang-rr", "sglang-router", "round_robin", _peer(sglang, "round_robin")),
            Target("sglang-cache", "sglang-router", "cache_aware", _peer(sglang, "cache_aware")),
        ]
    return found


# --- the client ---------------------------------------------------------------------------------


@dataclass
class Sample:
    group: int
    start: float
    first_byte: float = 0.0
    end: float = 0.0
    engine: str = ""
    error: str = ""


async def send(session: aiohttp.ClientSession, url: str, group: int, body: bytes) -> Sample:
    sample = Sample(group, time.perf_counter())
    try:
        async with session.post(url, data=body, headers=JSON_HEADERS) as response:
            seen = b""
            async for chunk in response.content.iter_any():
                if not sample.first_byte:
                    sample.first_byte = time.perf_counter()
                if not sample.engine:
                    seen += chunk
                    found = FINGERPRINT.search(seen)
                    if found:
                        sample.engine = found.group(1).decode()
            sample.end = time.perf_counter()
            if response.status != 200:
                sample.error = f"HTTP {response.status}"
    except (aiohttp.ClientError, TimeoutError) as error:
        sample.error = type(error).__name__
    return sample


Destinations = Callable[[], str]  # the URL of the next request


def destinations(target: Target, fleet: Fleet, router_url: str | None) -> Destinations:
    path = "/v1/chat/completions"
    if router_url is not None:
        return lambda: f"{router_url}{path}"
    urls = list(fleet.urls.values())[: target.direct_engines or None]
    turn = iter(range(1 << 62))
    return lambda: f"{urls[next(turn) % len(urls)]}{path}"


async def open_loop(
    session: aiohttp.ClientSession, where: Destinations, workload: Workload, rate: float,
    duration_s: float, rng: random.Random, poisson: bool,
) -> list[Sample]:  # fmt: skip
    tasks = []
    started = time.perf_counter()
    due = 0.0
    while due < duration_s:
        delay = started + due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        group, body = workload.take()
        tasks.append(asyncio.create_task(send(session, where(), group, body)))
        due += rng.expovariate(rate) if poisson else 1.0 / rate
    return list(await asyncio.gather(*tasks))


async def closed_loop(
    session: aiohttp.ClientSession, where: Destinations, workload: Workload, clients: int,
    duration_s: float,
) -> list[Sample]:  # fmt: skip
    deadline = time.perf_counter() + duration_s
    done: list[Sample] = []

    async def client() -> None:
        while time.perf_counter() < deadline:
            group, body = workload.take()
            sample = await send(session, where(), group, body)
            if sample.end <= deadline:
                done.append(sample)

    await asyncio.gather(*(client() for _ in range(clients)))
    return done


# --- figures ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class OpenLoopFigures:
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    ttfb_p50_ms: float
    ttfb_p99_ms: float

    @classmethod
    def of(cls, samples: list[Sample]) -> OpenLoopFigures:
        ok = [s for s in samples if not s.error and s.end]
        if not ok:
            return cls(len(samples), len(samples), 0.0, 0.0, 0.0, 0.0, 0.0)
        span = max(s.end for s in ok) - min(s.start for s in samples)
        latency = [(s.end - s.start) * 1e3 for s in ok]
        ttfb = [(s.first_byte - s.start) * 1e3 for s in ok]
        return cls(
            len(samples), len(samples) - len(ok), len(ok) / span,
            percentile(latency, 0.5), percentile(latency, 0.99),
            percentile(ttfb, 0.5), percentile(ttfb, 0.99),
        )  # fmt: skip


@dataclass
class GroupFigures:
    engines_used: int
    homes: int  # engines home to at least one group
    stickiness: float  # share of requests served by their group's home
    spread: bool  # every engine a home, every request at home
    home_of: dict[int, str] = field(default_factory=dict)

    @classmethod
    def of(cls, samples: list[Sample], engines: int) -> GroupFigures:
        by_group: dict[int, Counter] = defaultdict(Counter)
        for sample in samples:
            if sample.engine:
                by_group[sample.group][sample.engine] += 1
        home_of = {g: counts.most_common(1)[0][0] for g, counts in sorted(by_group.items())}
        at_home = sum(counts[home_of[g]] for g, counts in by_group.items())
        total = sum(sum(counts.values()) for counts in by_group.values())
        used = len({engine for counts in by_group.values() for engine in counts})
        homes = len(set(home_of.values()))
        stickiness = at_home / total if total else 0.0
        return cls(used, homes, stickiness, homes == engines and at_home == total, home_of)


@dataclass
class TargetResult:
    target: Target
    baselines: list[OpenLoopFigures]  # the direct baseline's rounds
    rounds: list[OpenLoopFigures]  # the target's rounds, each just after its baseline's
    figures: OpenLoopFigures  # the target's rounds pooled
    max_rps: float
    router_cpu_ms: float
    engine_cpu_ms: float
    groups: GroupFigures
    closed_stickiness: float

    def added_ms(self, field_name: str) -> list[float]:
        """Per round, the target's percentile minus its baseline's."""
        if self.target.key == "direct-rr":
            return [0.0] * len(self.rounds)
        return [
            getattr(mine, field_name) - getattr(direct, field_name)
            for mine, direct in zip(self.rounds, self.baselines)
        ]

    def row(self) -> dict:
        added_p50, added_p99 = self.added_ms("p50_ms"), self.added_ms("p99_ms")
        return {
            "router": self.target.router,
            "policy": self.target.policy,
            "rps": round(statistics.mean(figures.rps for figures in self.rounds), 1),
            "added_p50_ms": round(statistics.median(added_p50), 3),
            "added_p99_ms": round(statistics.median(added_p99), 3),
            "max_rps": round(self.max_rps, 1),
            "cpu_ms_per_req": round(self.router_cpu_ms, 3),
            "engines_used": self.groups.engines_used,
            "groups_spread": self.groups.spread,
            "group_stickiness": round(self.groups.stickiness, 4),
            "added_p50_ms_rounds": [round(value, 3) for value in added_p50],
            "added_p99_ms_rounds": [round(value, 3) for value in added_p99],
        }


# --- one target ---------------------------------------------------------------------------------


async def probe(session: aiohttp.ClientSession, url: str) -> bool:
    body = {"model": "fake", "messages": [{"role": "user", "content": "ping"}], "stream": True}
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        await response.read()
        return response.status == 200


async def run_target(
    target: Target, args: argparse.Namespace, workload: Workload, tokenizer_dir: Path,
    workdir: Path,
) -> TargetResult:  # fmt: skip
    timeout = aiohttp.ClientTimeout(total=30, sock_connect=5)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        fleet = await start_fleet(session, args.engines, tokenizer_dir, workdir)
        router: Process | None = None
        rng = random.Random(args.seed)
        poisson = args.arrivals == "poisson"
        baselines: list[OpenLoopFigures] = []
        rounds: list[OpenLoopFigures] = []
        served: list[Sample] = []
        cpu_router = cpu_engines = 0.0
        try:
            direct = destinations(Target("direct-rr", "direct", "round_robin"), fleet, None)
            await asyncio.gather(*(send(session, direct(), *workload.take()) for _ in range(32)))
            router_url = None
            if target.command is not None:
                port, metrics = free_ports(2)
                command = target.command(port, metrics, fleet.urls, tokenizer_dir)
                router = start(target.key, command, workdir)
                router_url = f"http://127.0.0.1:{port}"

                async def ready() -> bool:
                    if not router.alive():
                        raise RuntimeError(f"{target.key} exited:\n{log_tail(router)}")
                    return await probe(session, router_url)

                await wait_until(ready, target.key, 120)
            where = destinations(target, fleet, router_url)
            # warm-up: each group once, one at a time, on idle engines; then a second of load
            routed = []
            for group in range(args.groups):
                body = next(b for g, b in workload.bodies if g == group)
                routed.append(await send(session, where(), group, body))
            routed += await open_loop(session, where, workload, args.rate, 1.0, rng, poisson)
            # rounds: the direct baseline, then the target, in turn, so both see the machine alike
            for _ in range(args.rounds):
                if target.key != "direct-rr":
                    baseline = await open_loop(
                        session, direct, workload, args.rate, args.duration, rng, poisson
                    )
                    baselines.append(OpenLoopFigures.of(baseline))
                gc.collect()
                cpu_router -= router.cpu_s() if router else 0.0
                cpu_engines -= fleet.cpu_s()
                samples = await open_loop(
                    session, where, workload, args.rate, args.duration, rng, poisson
                )
                cpu_router += router.cpu_s() if router else 0.0
                cpu_engines += fleet.cpu_s()
                rounds.append(OpenLoopFigures.of(samples))
                served += samples
            closed = await closed_loop(session, where, workload, args.clients, args.closed_duration)
            if router is not None and not router.alive():
                raise RuntimeError(f"{target.key} exited:\n{log_tail(router)}")
        finally:
            if router is not None:
                router.stop()
            fleet.stop()
    figures = OpenLoopFigures.of(served)
    ok = max(1, figures.requests - figures.errors)
    groups = GroupFigures.of(routed + served, args.engines)
    closed_home = sum(groups.home_of.get(s.group) == s.engine for s in closed)
    return TargetResult(
        target=target,
        baselines=baselines or rounds,
        rounds=rounds,
        figures=figures,
        max_rps=len([s for s in closed if not s.error]) / args.closed_duration,
        router_cpu_ms=cpu_router * 1e3 / ok,
        engine_cpu_ms=cpu_engines * 1e3 / ok,
        groups=groups,
        closed_stickiness=closed_home / len(closed) if closed else 0.0,
    )


# --- the whole path, as a microbenchmark ---------------------------------------------------------


def save_tokenizer(directory: Path) -> Path:
    """SmolLM2-135M-Instruct's tokenizer and chat template as a plain HF directory (the one
    `kvcache.connector.smollm2.load` returns, without loading the model)."""
    if (directory / "tokenizer.json").is_file():
        return directory
    from transformers import AutoTokenizer

    from kvcache.connector import smollm2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(smollm2.model_dir(), gguf_file=smollm2.GGUF_FILE)
    tokenizer.save_pretrained(directory)
    return directory


def path_benchmark(tokenizer_dir: Path, args: argparse.Namespace) -> dict:
    """`PrefixPolicy.rank` on 4K-token chat prompts, as the router calls it, in two cases:
    - continued: a conversation's next turn, its earlier turns ranked before (untimed), its system
      prompt one of 8 shared ones: the router's piece and block caches hold all but the new turn;
    - new: a conversation nothing has seen (its own system prompt, its own turns): every piece is
      tokenized and every block hashed.
    Beside them, the same prompts through transformers' `apply_chat_template(tokenize=True)` and
    `block_hashes` uncached: what the path cost before the caches."""
    from kvcache.router.block_hash import block_hashes
    from kvcache.router.engines import Engine
    from kvcache.router.kv_events import BlockStored, EventBatch
    from kvcache.router.policy import PolicySettings, PrefixPolicy
    from kvcache.router.tokenize import Tokenizer

    sys.path.insert(0, str(Path(__file__).parent))
    from router_decision import fill

    rng = random.Random(args.seed)
    tokenizer = Tokenizer(str(tokenizer_dir))
    reference = Tokenizer(str(tokenizer_dir))._tokenizer  # transformers' own, no cache
    path = "/v1/chat/completions"
    settings = PolicySettings(index_capacity_blocks=args.path_blocks)
    policy = PrefixPolicy(settings, tokenizer)
    names = [f"engine-{i}" for i in range(args.path_engines)]
    engines = [Engine(name, f"http://127.0.0.1:{9000 + i}") for i, name in enumerate(names)]
    for name in names:
        policy.index.add_engine(name)
    corpus = "\n\n".join(text(name) for name in PROSE)

    def turn(number: int, messages: list[dict]) -> dict:
        words = " ".join(rng.choices(WORDS, k=80))
        role = "user" if len(messages) % 2 else "assistant"
        return {"role": role, "content": f"Turn {number}.{len(messages)}: {words}"}

    def template_ids(messages: list[dict], **switches: bool) -> list[int]:
        return list(reference.apply_chat_template(
            messages, tokenize=True, return_dict=False, **{"add_generation_prompt": True,
                                                           **switches}))  # fmt: skip

    def chat(number: int, system: str) -> tuple[list[dict], list[dict]]:
        """A conversation's last two prompts, turn by turn until the last is `path_tokens` long
        (English prose and these words run ~4 characters a token: count only near the end)."""
        messages = [{"role": "system", "content": system}]
        chars = len(system)
        while True:
            earlier, messages = messages, [*messages, turn(number, messages)]
            chars += len(messages[-1]["content"])
            if chars >= 3.5 * args.path_tokens and len(template_ids(messages)) >= args.path_tokens:
                return earlier, messages

    def fresh_system() -> str:
        start = rng.randrange(len(corpus) - 4000)
        return f"You are assistant {rng.getrandbits(32):x}.\n\n" + corpus[start : start + 3900]

    samples = args.path_prompts * args.path_repeats
    continued = [chat(n, system_prompt(n % 8, 8, 4000)) for n in range(samples)]
    new = [chat(n, fresh_system())[1] for n in range(samples)]
    block = settings.block_size
    # the index: the system prompts on every engine, each continued chat on one engine, then
    # random 4K-token conversations (router_decision's fill) up to `path_blocks` entries
    for number, prompts in enumerate(continued):
        hashes = block_hashes(template_ids(prompts[1]), block, settings.hash_seed)
        shared = len(template_ids(prompts[1][:1], add_generation_prompt=False))
        holders = names if number < 8 else [names[number % len(names)]]
        for name, held in ((name, hashes[: shared // block]) for name in holders[:-1]):
            policy.index.apply(name, EventBatch(0, 0.0, (BlockStored(tuple(held), None, (), block,
                                                                     medium="GPU"),)))  # fmt: skip
        event = BlockStored(tuple(hashes), None, (), block, medium="GPU")
        policy.index.apply(holders[-1], EventBatch(0, 0.0, (event,)))
    held = sum(policy.index.blocks(name) for name in names)
    fill(policy.index, names, args.path_blocks - held, args.path_tokens // block, rng)
    indexed = sum(policy.index.blocks(name) for name in names)

    async def timed() -> dict[str, list[float]]:
        steps: dict[str, list[float]] = defaultdict(list)
        clock = time.perf_counter

        async def rank(case: str, messages: list[dict]) -> None:
            payload = {"model": "fake", "messages": messages}
            gc.disable()
            start = clock()
            decision = await policy.rank(path, payload, engines)
            ranked = clock()
            ids = template_ids(messages)
            tokenized = clock()
            hashes = block_hashes(ids, block, settings.hash_seed)
            hashed = clock()
            gc.enable()
            assert decision.block_hashes == hashes and decision.ranking
            steps[case].append((ranked - start) * 1e3)
            steps["transformers"].append((tokenized - ranked) * 1e3)
            steps["uncached_hash"].append((hashed - tokenized) * 1e3)
            steps["tokens"].append(len(ids))

        for (earlier, prompt), fresh in zip(continued, new):
            await policy.rank(path, {"model": "fake", "messages": earlier}, engines)
            await rank("continued", prompt)
            await rank("new", fresh)
        return steps

    steps = asyncio.run(timed())
    return {
        "router": "kvcache",
        "policy": "path: chat template, tokenizer, block hashes, decision",
        "path_p50_ms": round(statistics.median(steps["new"]), 3),
        "path_p99_ms": round(percentile(steps["new"], 0.99), 3),
        "continued_path_p50_ms": round(statistics.median(steps["continued"]), 3),
        "continued_path_p99_ms": round(percentile(steps["continued"], 0.99), 3),
        "transformers_tokenize_p99_ms": round(percentile(steps["transformers"], 0.99), 3),
        "uncached_hash_p99_ms": round(percentile(steps["uncached_hash"], 0.99), 3),
        "prompt_tokens": int(statistics.median(steps["tokens"])),
        "block_size": block,
        "indexed_blocks": indexed,
        "engines": len(names),
        "samples": len(steps["new"]),
    }


# --- the run ------------------------------------------------------------------------------------


def print_table(results: list[TargetResult]) -> None:
    header = (f"{'router':<14} {'policy':<14} {'rps':>6} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'+p50 ms':>8} {'+p99 ms':>8} {'ttfb50':>7} {'max rps':>8} {'cpu ms/req':>10} "
              f"{'eng cpu':>8} {'engines':>7} {'homes':>5} {'sticky':>7} {'closed':>7} "
              f"{'err':>4}")  # fmt: skip
    print(header)
    for result in results:
        row, figures = result.row(), result.figures
        print(
            f"{row['router']:<14} {row['policy']:<14} {row['rps']:>6.1f} {figures.p50_ms:>7.2f} "
            f"{figures.p99_ms:>7.2f} {row['added_p50_ms']:>8.2f} {row['added_p99_ms']:>8.2f} "
            f"{figures.ttfb_p50_ms:>7.2f} {row['max_rps']:>8.0f} {row['cpu_ms_per_req']:>10.3f} "
            f"{result.engine_cpu_ms:>8.3f} {row['engines_used']:>7} {result.groups.homes:>5} "
            f"{result.groups.stickiness:>7.3f} {result.closed_stickiness:>7.3f} "
            f"{figures.errors:>4}"
        )  # fmt: skip


def selected(spec: str) -> list[Target]:
    available = targets()
    if spec in ("all", "none"):
        return available if spec == "all" else []
    keys = spec.split(",")
    unknown = set(keys) - {t.key for t in available}
    if unknown:
        sys.exit(f"unknown or unavailable targets {sorted(unknown)}; "
                 f"available: {[t.key for t in available]}")  # fmt: skip
    return [t for t in available if t.key in keys]


def event_loop() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's when installed: the client's own overhead is in every row."""
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=15.0, help="open loop, seconds")
    parser.add_argument("--closed-duration", type=float, default=10.0, help="closed loop, s")
    parser.add_argument("--rate", type=float, default=200.0, help="open loop, requests/s")
    parser.add_argument("--rounds", type=int, default=3, help="baseline + target open loops")
    parser.add_argument("--arrivals", choices=["poisson", "fixed"], default="poisson")
    parser.add_argument("--clients", type=int, default=32, help="closed loop concurrency")
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--groups", type=int, default=8, help="shared system prompts")
    parser.add_argument("--system-chars", type=int, default=3900)
    parser.add_argument("--targets", default="all", help="comma-separated keys, all or none")
    parser.add_argument("--tokenizer-dir", type=Path, help="SmolLM2 tokenizer (saved if absent)")
    parser.add_argument("--path-tokens", type=int, default=4096)
    parser.add_argument("--path-prompts", type=int, default=32)
    parser.add_argument("--path-repeats", type=int, default=10)
    parser.add_argument("--path-blocks", type=int, default=100_000)
    parser.add_argument("--path-engines", type=int, default=64)
    parser.add_argument("--skip-path", action="store_true")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--decision", type=Path,
                        default=Path("benchmarks/results/router_decision.json"))  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/router_overhead.json"))
    args = parser.parse_args()

    began = time.monotonic()
    chosen = selected(args.targets)
    workdir = Path(tempfile.mkdtemp(prefix="router-overhead-"))
    tokenizer_dir = save_tokenizer(args.tokenizer_dir or workdir / "smollm2-tokenizer")
    print(f"logs in {workdir}; {platform.node()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
    path_row = None
    if not args.skip_path:
        path_row = path_benchmark(tokenizer_dir, args)
        print(f"whole path, {path_row['prompt_tokens']}-token chat prompt, "
              f"{path_row['indexed_blocks']} blocks over {path_row['engines']} engines: new "
              f"conversation p50 {path_row['path_p50_ms']} ms, p99 {path_row['path_p99_ms']} ms; "
              f"continued p50 {path_row['continued_path_p50_ms']} ms, "
              f"p99 {path_row['continued_path_p99_ms']} ms (uncached, for reference: "
              f"transformers' tokenizer p99 {path_row['transformers_tokenize_p99_ms']} ms, "
              f"hashes {path_row['uncached_hash_p99_ms']} ms)", flush=True)  # fmt: skip

    workload = Workload.build(args.seed, args.groups, args.system_chars)
    results = []
    with asyncio.Runner(loop_factory=event_loop()) as runner:
        for target in chosen:
            result = runner.run(run_target(target, args, workload, tokenizer_dir, workdir))
            results.append(result)
            print_table([result])
    print()
    print(f"open loop {args.rate:.0f} req/s ({args.arrivals}), {args.duration:.0f} s a round; "
          f"closed loop {args.clients} clients for {args.closed_duration:.0f} s; "
          f"+p50/+p99: median over {args.rounds} rounds of the target against the direct "
          f"round-robin baseline sent just before it")  # fmt: skip
    print_table(results)
    rows = [result.row() for result in results]
    if path_row is not None:
        rows.append(path_row)
    if args.decision.is_file():
        decision = json.loads(args.decision.read_text())
        rows.append({key: decision[key] for key in ("router", "decision_p99_us",
                                                    "indexed_blocks", "engines")})  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out} in {time.monotonic() - began:.0f} s")
    if not args.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
