"""How the router turns a request into the engine's prompt, on plain values: vLLM's conversation
(content forms, tool calls), how a chat template wants message contents, and token-id prompts.
`test_vllm_routing.py` checks the whole path against a real engine's `/tokenize`."""

from __future__ import annotations

import pytest

from kvcache.router.tokenize import content_format, conversation, prompt_token_ids

MESSAGES = [
    {"role": "system", "content": None},
    {"role": "user", "content": [{"type": "text", "text": "a"}, "b", {"type": "input_text",
                                                                      "text": "c"}],
     "name": "bob", "ignored": 1},
    {"role": "assistant", "content": "ok", "reasoning": "because", "tool_calls": [
        {"id": "t", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": "u", "type": "function", "function": {"name": "g", "arguments": "not json"}}]},
    {"role": "tool", "tool_call_id": "t", "content": [{"type": "text", "text": "1"},
                                                      {"type": "text", "text": "2"}]},
]  # fmt: skip


def test_text_parts_join_with_newlines_for_templates_that_print_the_content():
    assert conversation(MESSAGES, "string") == [
        {"role": "system", "content": ""},
        {"role": "user", "content": "a\nb\nc", "name": "bob"},
        {"role": "assistant", "content": "ok", "reasoning": "because",
         "reasoning_content": "because", "tool_calls": [
             {"id": "t", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
             {"id": "u", "type": "function", "function": {"name": "g", "arguments": {}}}]},
        {"role": "tool", "content": "1\n2", "tool_call_id": "t"},
    ]  # fmt: skip
    assert MESSAGES[2]["tool_calls"][0]["function"]["arguments"] == '{"x": 1}'  # untouched


def test_text_parts_stay_parts_for_templates_that_loop_over_the_content():
    user, tool = conversation(MESSAGES, "openai")[1], conversation(MESSAGES, "openai")[3]
    assert user["content"] == [{"type": "text", "text": t} for t in "abc"]
    assert tool["content"] == "1\n2"  # vLLM flattens a tool's text parts for every template
    assert conversation([{"role": "user", "content": "hi"}], "openai")[0]["content"] == [
        {"type": "text", "text": "hi"}
    ]


def test_a_part_the_router_cannot_render_refuses_the_request():
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    with pytest.raises(ValueError, match="cannot render"):
        conversation([{"role": "user", "content": [image]}], "string")


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "string"),
        (
            "{% for m in messages %}{% for p in m['content'] %}{{ p.text }}{% endfor %}"
            "{% endfor %}",
            "openai",
        ),  # fmt: skip
        (
            "{% for m in messages %}{% for p in m.content | list %}{{ p }}{% endfor %}{% endfor %}",
            "openai",
        ),  # fmt: skip
        (
            "{% for m in messages %}{% set content = m.content %}{% for p in content %}{{ p }}"
            "{% endfor %}{% endfor %}",
            "openai",
        ),  # fmt: skip
        ("{% for m in messages %}{{ m['content'] }", "string"),  # broken: vLLM's fallback
    ],
)
def test_the_content_format_follows_the_template(template, expected):
    assert content_format(template) == expected


def test_prompts_given_as_token_ids_are_taken_as_is():
    assert prompt_token_ids("/v1/completions", {"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert prompt_token_ids("/v1/completions", {"prompt": [[5, 6], [8]]}) == [5, 6]
    assert prompt_token_ids("/v1/completions", {"prompt": "text"}) is None
    assert prompt_token_ids("/v1/completions", {"prompt": []}) is None
    assert prompt_token_ids("/v1/chat/completions", {"prompt": [5, 6]}) is None
