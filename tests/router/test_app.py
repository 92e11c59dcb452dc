"""The router's proxy over real HTTP: uvicorn servers on loopback for the router and for instant
fake engines. Forwarding, streaming chunk by chunk, retries before the first byte, engines that
leave and rejoin the rotation, and a client that leaves mid-stream cancelling the engine's work."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import pytest
from http_servers import ServerThread, free_port, serving, wait_for

from kvcache.router.app import create_app
from kvcache.router.engines import Engine, EnginePool, HealthSettings, parse_metrics
from kvcache.testing.fake_engine import FakeEngineState
from kvcache.testing.fake_engine import create_app as fake_engine


@dataclass
class Ranking:
    ranking: list[Engine]


class InOrder:
    """Ranks the healthy engines in the pool's order (the proxy's mechanics under test, not the
    choice); remembers where requests went and which engines went down."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.answered: list[str] = []
        self.down: list[str] = []

    async def run(self) -> None:
        return

    async def rank(self, path: str, payload: dict, engines: list[Engine]) -> Ranking:
        return Ranking(list(engines))

    def routed(self, decision: Ranking, engine: Engine) -> None:
        self.sent.append(engine.name)

    def first_byte(self, decision: Ranking, engine: Engine) -> None:
        self.answered.append(engine.name)

    def engine_down(self, engine: Engine) -> None:
        self.down.append(engine.name)

    def metrics(self) -> list:
        from prometheus_client.core import CounterMetricFamily

        return [CounterMetricFamily("kvcache_router_in_order_decisions", "requests ranked",
                                    value=len(self.sent))]  # fmt: skip


def pool_of(urls: list[str], interval_s: float = 0.1) -> EnginePool:
    settings = HealthSettings(interval_s=interval_s, timeout_s=0.5, unhealthy_after=2)
    pool = EnginePool(settings=settings)
    pool.set_engines(Engine(f"e{i}", url) for i, url in enumerate(urls))
    return pool


CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


def test_requests_are_forwarded_and_streams_relayed_chunk_by_chunk():
    states = [FakeEngineState("e0", chunks=5), FakeEngineState("e1")]
    with serving(*(fake_engine(s) for s in states)) as engines:
        policy = InOrder()
        with serving(create_app(pool_of([e.url for e in engines]), policy)) as (router,):
            answer = httpx.post(f"{router.url}/v1/chat/completions", json=CHAT)
            assert answer.status_code == 200
            assert answer.json()["system_fingerprint"] == "e0"
            with httpx.stream(
                "POST", f"{router.url}/v1/completions", json={"prompt": "x", "stream": True}
            ) as stream:
                events = [line for line in stream.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and len(events) == 6
            assert json.loads(events[0][6:])["choices"][0]["text"] == " t0"
            assert states[0].requests[-1] == {"prompt": "x", "stream": True}
            assert policy.sent == policy.answered == ["e0", "e0"]
            assert httpx.get(f"{router.url}/v1/models").json()["data"][0]["id"] == "fake"
            assert httpx.get(f"{router.url}/healthz").json()["healthy_engines"] == 2
            metrics = httpx.get(f"{router.url}/metrics").text
            assert 'kvcache_router_requests_total{engine="e0",outcome="ok"} 2.0' in metrics


def test_a_bad_body_is_refused_with_a_clear_error():
    with serving(fake_engine(FakeEngineState("e0"))) as engines:
        with serving(create_app(pool_of([engines[0].url]), InOrder())) as (router,):
            answer = httpx.post(f"{router.url}/v1/completions", content=b"{not json")
            assert answer.status_code == 400
            assert "bad request body" in answer.json()["error"]["message"]
            answer = httpx.post(f"{router.url}/v1/completions", json=[1, 2])
            assert answer.status_code == 400


def test_unreachable_and_failing_engines_are_skipped_before_the_first_byte():
    dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    failing, working = FakeEngineState("e1", fail_status=503), FakeEngineState("e2")
    with serving(fake_engine(failing), fake_engine(working)) as (e1, e2):
        policy = InOrder()
        # scrapes far apart: the request, not the health check, finds the dead engine
        pool = pool_of([dead_url, e1.url, e2.url], interval_s=60)
        with serving(create_app(pool, policy)) as (router,):
            answer = httpx.post(f"{router.url}/v1/chat/completions", json=CHAT)
            assert answer.status_code == 200 and answer.json()["system_fingerprint"] == "e2"
            assert len(failing.requests) == 1 and len(working.requests) == 1
            assert not pool.engines["e0"].healthy  # left the rotation at once
            # and no engine is left counting a request that never reached it or is over
            wait_for(
                lambda: all(not e.in_flight and not e.awaiting_first_token
                            for e in pool.engines.values()),
                5, "the router's counts to settle",
            )  # fmt: skip
            assert policy.sent == ["e2"] and policy.down == ["e0"]
            metrics = httpx.get(f"{router.url}/metrics").text
            assert "kvcache_router_retries_total 2.0" in metrics
            assert "kvcache_router_in_order_decisions_total 1.0" in metrics  # the policy's own
            # with every engine failing, the client gets the last engine's answer
            working.fail_status = 500
            answer = httpx.post(f"{router.url}/v1/chat/completions", json=CHAT)
            assert answer.status_code == 500


def test_engines_leave_the_rotation_within_seconds_and_come_back():
    state = FakeEngineState("e0")
    engine = ServerThread(fake_engine(state)).start()
    pool = pool_of([engine.url])
    with serving(create_app(pool, InOrder())) as (router,):
        wait_for(lambda: httpx.get(f"{router.url}/healthz").status_code == 200, 5, "healthy")
        engine.stop()
        wait_for(lambda: not pool.engines["e0"].healthy, 3, "the dead engine to leave")
        answer = httpx.post(f"{router.url}/v1/chat/completions", json=CHAT)
        assert answer.status_code == 503 and "no healthy engine" in answer.text
        assert httpx.get(f"{router.url}/healthz").status_code == 503
        assert httpx.get(f"{router.url}/livez").status_code == 200  # no restart for that
        engine = ServerThread(fake_engine(state), port=engine.port).start()
        try:
            wait_for(lambda: pool.engines["e0"].healthy, 3, "the engine to come back")
            assert httpx.post(f"{router.url}/v1/chat/completions", json=CHAT).status_code == 200
        finally:
            engine.stop()


def test_a_client_leaving_mid_stream_cancels_the_engines_work():
    slow = FakeEngineState("e0", chunks=200, chunk_delay_s=0.02)
    with serving(fake_engine(slow)) as engines:
        pool = pool_of([engines[0].url])
        with serving(create_app(pool, InOrder())) as (router,):
            body = {**CHAT, "stream": True}
            with httpx.stream("POST", f"{router.url}/v1/chat/completions", json=body) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("data: ")
                assert slow.running == 1
            wait_for(lambda: slow.abandoned_streams == 1, 5, "the engine to see the client leave")
            assert slow.running == 0
            wait_for(lambda: pool.engines["e0"].in_flight == 0, 5, "in-flight to drop")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('vllm:num_requests_running{model_name="m"} 3.0\n', (3.0, 0.0)),
        (
            "# TYPE vllm:num_requests_waiting gauge\n"
            'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0\n'
            'vllm:num_requests_waiting{engine="1",model_name="m"} 1.0\n',
            (0.0, 3.0),
        ),
        (  # among other families, a label value with spaces and braces, a timestamp
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            'vllm:num_requests_running{model_name="a } b",engine="0"} 4 1700000000000\n'
            'vllm:num_requests_running_seconds_bucket{le="+Inf",model_name="m"} 9.0\n'
            'vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="m"} 0.0\n'
            'vllm:num_requests_waiting{model_name="m"} 1.5\n'
            'python_gc_objects_collected_total{generation="0"} 1234.0\n',
            (4.0, 1.5),
        ),
    ],
)
def test_engine_load_is_read_from_vllm_gauges(text, expected):
    found = parse_metrics(text)
    assert (found.running, found.waiting) == expected
    assert found.key_labels is None


def test_the_fake_engine_stands_in_for_vllm_with_the_flags_a_join_adds():
    """The e2e tests run it as the engine an annotated Deployment joins (e2e/test_kind.py)."""
    from kvcache.operator.join import engine_flags

    port = free_port()
    command = [sys.executable, "-m", "kvcache.testing.fake_engine", "--port", str(port),
               "--name", "stand-in", "--model", "m", *engine_flags()]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def healthy() -> bool:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(healthy, 30, "the stand-in engine")
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT)
        assert answer.json()["system_fingerprint"] == "stand-in"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_requests_go_only_to_engines_that_serve_their_model_and_models_are_listed_from_all():
    """Two pools behind one router: a request for model B never reaches model A's engine, a
    LoRA adapter is served where it is loaded, an unknown model is an OpenAI 404, and
    /v1/models lists every engine's models (not the first engine's)."""
    alpha = FakeEngineState("alpha", models=("model-a",))
    beta = FakeEngineState("beta", models=("model-b", "b-alias"), adapters=("b-sql",))
    with serving(fake_engine(alpha), fake_engine(beta)) as (a, b):
        pool = pool_of([a.url, b.url])
        with serving(create_app(pool, InOrder())) as (router,):
            wait_for(lambda: all(e.models for e in pool.engines.values()), 5, "model lists")
            for model, expected in [("model-a", "alpha"), ("model-b", "beta"),
                                    ("b-alias", "beta"), ("b-sql", "beta")]:  # fmt: skip
                answer = httpx.post(f"{router.url}/v1/chat/completions",
                                    json={**CHAT, "model": model})  # fmt: skip
                assert answer.json()["system_fingerprint"] == expected, model
            assert pool.engines["e1"].models == {"model-b": "", "b-alias": "", "b-sql": "b-sql"}
            missing = httpx.post(f"{router.url}/v1/chat/completions", json={**CHAT, "model": "x"})
            assert missing.status_code == 404
            assert missing.json()["error"]["type"] == "NotFoundError"
            listed = [card["id"] for card in httpx.get(f"{router.url}/v1/models").json()["data"]]
            assert sorted(listed) == ["b-alias", "b-sql", "model-a", "model-b"]
            assert len(alpha.requests) == 1 and len(beta.requests) == 3


def test_errors_name_no_engine_and_a_final_error_is_not_counted_as_ok():
    dead_url = f"http://127.0.0.1:{free_port()}"
    refusing = FakeEngineState("e1", fail_status=400)
    with serving(fake_engine(refusing)) as (e1,):
        pool = pool_of([e1.url], interval_s=60)
        with serving(create_app(pool, InOrder())) as (router,):
            assert httpx.post(f"{router.url}/v1/chat/completions", json=CHAT).status_code == 400
            metrics = httpx.get(f"{router.url}/metrics").text
            assert 'kvcache_router_requests_total{engine="e0",outcome="400"} 1.0' in metrics
            assert 'outcome="ok"' not in metrics
        pool = pool_of([dead_url], interval_s=60)
        with serving(create_app(pool, InOrder())) as (router,):
            answer = httpx.post(f"{router.url}/v1/chat/completions", json=CHAT)
            assert answer.status_code == 502
            assert answer.json()["error"]["type"] == "BadGatewayError"
            assert "127.0.0.1" not in answer.text and "e0" not in answer.text


def test_the_pool_learns_each_engines_key_settings_and_salts_them_as_the_operator_did():
    from kvcache.core.keys import EngineKeySettings

    published = EngineKeySettings(model="m", kv_dtype="bfloat16", tp_size=2, chunk_tokens=512)
    state = FakeEngineState("e0", key_settings=published)
    with serving(fake_engine(state)) as (engine,):
        pool = EnginePool(settings=HealthSettings(interval_s=0.1, timeout_s=0.5))
        pool.set_engines([Engine("ml/e0", engine.url, tenant_salt="ml-salt")])
        with serving(create_app(pool, InOrder())):
            wait_for(lambda: pool.engines["ml/e0"].keys is not None, 5, "key settings")
            keys = pool.engines["ml/e0"].keys
            assert keys.tenant_salt == "ml-salt" and keys.tp_size == 2
            assert keys.namespace() == EngineKeySettings(
                model="m", kv_dtype="bfloat16", tp_size=2, chunk_tokens=512,
                tenant_salt="ml-salt",
            ).namespace()  # fmt: skip
            state.key_settings = None  # the engine came back without its connector
            wait_for(lambda: pool.engines["ml/e0"].keys is None, 5, "the settings to go")


def test_a_client_leaving_a_non_streamed_request_cancels_the_engines_work():
    """vLLM sends nothing of a non-streamed answer until it is complete: the router must notice
    the client leaving while it waits, and drop the engine's connection so vLLM aborts."""
    state = FakeEngineState("e0", answer_delay_s=5.0)
    with serving(fake_engine(state)) as (engine,):
        pool = pool_of([engine.url], interval_s=60)
        with serving(create_app(pool, InOrder())) as (router,):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{router.url}/v1/chat/completions", json=CHAT, timeout=0.5)
            wait_for(lambda: state.cancelled == 1, 3, "the engine to see the request abandoned")
            wait_for(lambda: pool.engines["e0"].in_flight == 0, 3, "the router's count to settle")
            assert pool.engines["e0"].healthy  # a client leaving is not the engine failing


def test_an_engine_that_hangs_is_given_up_on_after_the_timeouts():
    from kvcache.router.app import ProxySettings

    settings = ProxySettings(first_byte_timeout_s=0.5, idle_timeout_s=0.5)
    hung, working = FakeEngineState("e0", answer_delay_s=30.0), FakeEngineState("e1")
    with serving(fake_engine(hung), fake_engine(working)) as (e0, e1):
        pool = pool_of([e0.url, e1.url], interval_s=60)
        with serving(create_app(pool, InOrder(), settings)) as (router,):
            started = time.monotonic()
            answer = httpx.post(f"{router.url}/v1/chat/completions", json=CHAT, timeout=10)
            assert answer.json()["system_fingerprint"] == "e1"  # the next engine answered
            assert time.monotonic() - started < 5 and not pool.engines["e0"].healthy
    stalled = FakeEngineState("e0", first_chunk_delay_s=30.0)
    with serving(fake_engine(stalled)) as (engine,):
        pool = pool_of([engine.url], interval_s=60)
        with serving(create_app(pool, InOrder(), settings)) as (router,):
            started = time.monotonic()
            answer = httpx.post(f"{router.url}/v1/chat/completions",
                                json={**CHAT, "stream": True}, timeout=10)  # fmt: skip
            assert answer.status_code == 200 and answer.content == b""  # ended, not held
            assert time.monotonic() - started < 5
            wait_for(lambda: stalled.abandoned_streams == 1, 3, "the engine's stream dropped")


def test_a_body_over_the_limit_is_refused_before_it_is_read():
    from kvcache.router.app import ProxySettings

    state = FakeEngineState("e0")
    with serving(fake_engine(state)) as (engine,):
        pool = pool_of([engine.url], interval_s=60)
        with serving(create_app(pool, InOrder(), ProxySettings(max_body_bytes=1000))) as (router,):
            big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
            answer = httpx.post(f"{router.url}/v1/chat/completions", json=big)
            assert answer.status_code == 413 and answer.json()["error"]["code"] == 413

            def chunks():
                yield b'{"messages": "'
                for _ in range(10):
                    yield b"y" * 200  # no Content-Length: counted as it arrives

            answer = httpx.post(f"{router.url}/v1/chat/completions", content=chunks())
            assert answer.status_code == 413
            assert httpx.post(f"{router.url}/v1/chat/completions", json=CHAT).status_code == 200
            assert len(state.requests) == 1


def test_each_data_parallel_rank_is_reached_with_its_header_and_loaded_by_its_gauges():
    """vLLM sends a request with X-data-parallel-rank to that rank; its gauges carry the rank
    as their `engine` label, so each rank's load is its own."""
    text = (
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 1.0\n'
        'vllm:num_requests_waiting{engine="1",model_name="m"} 2.0\n'
    )
    assert (parse_metrics(text).running, parse_metrics(text).waiting) == (4.0, 2.0)
    assert (parse_metrics(text, 1).running, parse_metrics(text, 1).waiting) == (1.0, 2.0)
    state = FakeEngineState("e0")
    with serving(fake_engine(state)) as (engine,):
        pool = EnginePool(settings=HealthSettings(interval_s=60))
        pool.set_engines([Engine("ml/p/dp1", engine.url, dp_rank=1)])
        with serving(create_app(pool, InOrder())) as (router,):
            assert httpx.post(f"{router.url}/v1/chat/completions", json=CHAT).status_code == 200
    assert state.headers[-1]["x-data-parallel-rank"] == "1"
