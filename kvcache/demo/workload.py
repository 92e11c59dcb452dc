"""The demo's two workloads, as data: the prefix reuse a serving cluster sees every day.

- chat: one rider talks to a support assistant whose system prompt is a long handbook; every turn
  resends the whole conversation through the chat template, so each prompt starts with the one
  before it (the assistant's turns are the model's own replies, sent back into the plan);
- rag: questions about shared documents; a prompt is a short system prompt, one document and one
  question, so the questions on one document share everything up to the question.

The texts are package data under `texts/`. This module builds token ids only; it never runs the
model or touches the cache.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

HANDBOOK = "handbook.md"
CHAT_TURNS = (
    "Hi Pip! I'm on the Commuter plan and I'll be abroad for five weeks this summer. "
    "Can I pause my subscription?",
    "Great. Do I have to bring the bike back while it's paused, and what will I pay?",
    "Another thing: my battery used to last about 60 km and now I only get around 45 km. "
    "Is that a fault?",
    "Can you book a mechanic to look at it on Thursday morning, at my office?",
    "Thanks! Could you sum up what we agreed?",
)
RAG_SYSTEM = (
    "You answer questions about the document the user gives you. Use only the document; if the "
    "answer is not in it, say so. Answer in at most two sentences."
)


@dataclass(frozen=True)
class Document:
    name: str
    file: str
    questions: tuple[str, ...]


DOCUMENTS = (
    Document(
        "observatory",
        "observatory.md",
        (
            "Who founded the observatory, and why did she choose that place?",
            "How do I get there by car, and what should I bring on an observing night?",
            "What happens to a booked observing night if the sky is cloudy?",
        ),
    ),
    Document(
        "fernlight",
        "fernlight.md",
        (
            "What happens to my notebook the first time version 4.0 starts?",
            "Can I go back to version 3 after upgrading?",
            "What can a reader do in a shared space?",
        ),
    ),
    Document(
        "sourdough",
        "sourdough.md",
        (
            "How often should I feed a starter that lives in the fridge?",
            "My starter has grey liquid on top. Is it ruined?",
            "How do I dry a starter before a long trip?",
        ),
    ),
)


@dataclass(frozen=True)
class Request:
    workload: str  # "chat" or "rag"
    label: str  # which turn or question, for the demo's output
    prompt: list[int]


@cache
def text(file: str) -> str:
    return (resources.files(__package__) / "texts" / file).read_text(encoding="utf-8")


def template_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """`messages` through the chat template, ready for the assistant's turn."""
    # return_dict=False: a plain list of ids in every transformers version
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    return list(ids)


def chat_prompt(tokenizer: Any, replies: Sequence[str]) -> list[int]:
    """The prompt of turn `len(replies) + 1`: the handbook, then the user's turns so far with the
    assistant's `replies` between them."""
    messages = [{"role": "system", "content": text(HANDBOOK)}]
    for user, reply in zip(CHAT_TURNS, replies):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": CHAT_TURNS[len(replies)]})
    return template_ids(tokenizer, messages)


def rag_prompt(tokenizer: Any, document: Document, question: str) -> list[int]:
    content = f"{text(document.file)}\n\nQuestion: {question}"
    return template_ids(
        tokenizer, [{"role": "system", "content": RAG_SYSTEM}, {"role": "user", "content": content}]
    )


def reply_text(tokenizer: Any, tokens: Sequence[int]) -> str:
    """Generated tokens as the assistant's turn in the conversation: up to the end of the turn,
    without surrounding whitespace (the template adds its own)."""
    tokens = list(tokens)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if end in tokens:
        tokens = tokens[: tokens.index(end)]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def requests(tokenizer: Any) -> Generator[Request, str, None]:
    """The demo's requests in order: every chat turn, then every question on every document.
    Drive it with `send(reply_text)` after each request: the next chat turn's prompt holds it."""
    replies: list[str] = []
    for turn in range(len(CHAT_TURNS)):
        replies.append((yield Request("chat", f"turn {turn + 1}", chat_prompt(tokenizer, replies))))
    for document in DOCUMENTS:
        for number, question in enumerate(document.questions, 1):
            prompt = rag_prompt(tokenizer, document, question)
            yield Request("rag", f"{document.name} q{number}", prompt)
