"""`kvcache up` on the real SmolLM2: the workloads share the prefixes they are meant to, and the
demo serves every request, before and after its cluster is stopped, without an exception."""

from __future__ import annotations

import pytest

from kvcache.connector import smollm2
from kvcache.core.keys import DEFAULT_CHUNK_TOKENS
from kvcache.demo.workload import (
    CHAT_TURNS,
    DOCUMENTS,
    chat_prompt,
    rag_prompt,
    reply_text,
    requests,
    text,
)
from kvcache.up import DemoSettings, run_local_demo, workload_rows

REPLIES = [f"Reply number {turn}: yes, that is covered by the handbook." for turn in range(5)]


@pytest.fixture(scope="module")
def loaded():
    return smollm2.load()


def shared_length(prompts: list[list[int]]) -> int:
    return next(
        (i for i, ids in enumerate(zip(*prompts)) if len(set(ids)) > 1), min(map(len, prompts))
    )


def test_each_chat_turn_starts_with_the_prompt_of_the_turn_before(loaded):
    tokenizer, _ = loaded
    prompts = [chat_prompt(tokenizer, REPLIES[:turn]) for turn in range(len(CHAT_TURNS))]
    assert len(prompts[0]) >= 2 * DEFAULT_CHUNK_TOKENS
    for before, after in zip(prompts, prompts[1:]):
        assert len(after) > len(before) and after[: len(before)] == before


def test_questions_on_one_document_share_the_system_prompt_and_the_document(loaded):
    tokenizer, _ = loaded
    for document in DOCUMENTS:
        prompts = [rag_prompt(tokenizer, document, question) for question in document.questions]
        shared = shared_length(prompts)
        assert shared >= 2 * DEFAULT_CHUNK_TOKENS
        assert text(document.file).strip() in tokenizer.decode(prompts[0][:shared])
    assert shared_length([rag_prompt(tokenizer, d, d.questions[0]) for d in DOCUMENTS]) < 100


def test_the_plan_puts_each_reply_into_the_next_chat_turn(loaded):
    tokenizer, _ = loaded
    plan = requests(tokenizer)
    served = [next(plan)] + [plan.send(reply) for reply in REPLIES[: len(CHAT_TURNS)]]
    served += list(plan)
    assert [r.workload for r in served] == ["chat"] * 5 + ["rag"] * 9
    assert served[2].prompt == chat_prompt(tokenizer, REPLIES[:2])
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generated = tokenizer.encode(" Sure thing. ") + [end] + tokenizer.encode("more")
    assert reply_text(tokenizer, generated) == "Sure thing."


def test_the_demo_serves_every_request_when_its_cluster_is_killed_halfway(loaded):
    settings = DemoSettings(
        nodes=2,
        memory_bytes=256 << 20,
        max_new_tokens=4,
        requests=3,
        kill_cluster_after=2,
        local_bytes=0,  # every hit from the cluster, so the kill shows
    )
    summary = run_local_demo(settings, loaded)
    first, second, third = summary.requests
    assert [r.engine for r in summary.requests] == ["A", "B", "A"]
    assert first.hit_tokens == 0 and first.cluster_up
    assert second.cluster_hit_tokens >= 2 * DEFAULT_CHUNK_TOKENS and second.cluster_bytes > 0
    assert summary.cluster_killed_after == 2
    assert not third.cluster_up and third.hit_tokens == 0 and third.new_tokens == 4
    assert summary.node_stats == {"node-0": None, "node-1": None}
    assert [row[0] for row in workload_rows(summary.requests)] == ["chat", "chat (cluster down)"]
