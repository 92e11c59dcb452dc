"""A request's tokens as the engine will see them, so the router's block hashes match vLLM's.

Chat requests are rendered as vLLM 0.32 renders them (`vllm/renderers/hf.py`, `chat_utils.py`):
the messages become vLLM's conversation (text parts joined with newlines for templates that print
`message['content']`, kept as `{"type": "text"}` parts for templates that loop over it; a tool
call's JSON arguments as a dict), then the served model's chat template renders the whole
conversation with the request's own switches (`add_generation_prompt`, `continue_final_message`,
`chat_template`, `chat_template_kwargs`, `documents`, `tools`) and tokenizes it without adding
special tokens (the template has them). Completion prompts are encoded with special tokens unless
the request says otherwise, as vLLM's completions endpoint does. A prompt given as token ids is
used as is, tokenizer or not. What the router cannot reproduce (images, audio) raises, and the
request is routed by its text instead: approximate mode, where the text is cut into fixed
character chunks (also the mode of a router without a tokenizer).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

from kvcache.router.segment_tokens import SegmentTokenizer

log = logging.getLogger(__name__)

TEXT_CHUNK_CHARS = 128  # approximate mode, as vLLM production-stack's prefixaware routing
# Every this many prompts tokenized from cached pieces, one is tokenized whole as well and compared
# (~5 ms for 4K tokens: ~5 µs a prompt on average)
VERIFY_EVERY = 1024

ContentFormat = Literal["string", "openai"]
# vLLM's text content parts and the field holding each one's text
_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text",
               "refusal": "refusal", "thinking": "thinking"}  # fmt: skip
# chat_template_kwargs vLLM refuses or sets itself
_RESERVED_KWARGS = frozenset({"chat_template", "tokenize", "return_dict"})


@dataclass(frozen=True)
class Prompt:
    """What the router routes on: token ids (precise) or text chunks (approximate)."""

    token_ids: list[int] | None
    text: str


def request_text(path: str, payload: dict[str, Any]) -> str:
    """The prompt's text: the conversation's contents in order, or the completion prompt."""
    if path.endswith("chat/completions"):
        parts = []
        for message in payload.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):  # OpenAI content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"{message.get('role', '')}:{content or ''}\n")
        return "".join(parts)
    prompt = payload.get("prompt", "")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    return prompt if isinstance(prompt, str) else ""


def prompt_token_ids(path: str, payload: dict[str, Any]) -> list[int] | None:
    """A completion prompt given as token ids (the first of a batch), which vLLM takes as is."""
    if path.endswith("chat/completions"):
        return None
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return list(prompt)
    return None


def conversation(messages: list[Any], content_format: ContentFormat) -> list[dict[str, Any]]:
    """The messages as vLLM hands them to the chat template (`parse_chat_messages`, text only)."""
    rendered = []
    for message in messages:
        role, content = message["role"], message.get("content")
        if content is None:
            content = []
        elif isinstance(content, str):
            content = [content]
        texts = [_part_text(part) for part in content]
        texts = [text for text in texts if text is not None]
        if role == "tool" or content_format == "string":
            entry: dict[str, Any] = {"role": role, "content": "\n".join(texts)}
        else:
            entry = {"role": role, "content": [{"type": "text", "text": t} for t in texts]}
        if role == "assistant":
            if message.get("tool_calls"):
                entry["tool_calls"] = [_tool_call(call) for call in message["tool_calls"]]
            if message.get("reasoning") is not None:
                entry["reasoning"] = entry["reasoning_content"] = message["reasoning"]
        if role == "tool" and "tool_call_id" in message:
            entry["tool_call_id"] = message["tool_call_id"]
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        rendered.append(entry)
    return rendered


def _part_text(part: Any) -> str | None:
    if isinstance(part, str):
        return part
    field = _TEXT_PARTS.get(part.get("type")) if isinstance(part, dict) else None
    if field is None:
        raise ValueError(f"a content part the router cannot render: {str(part)[:80]}")
    return part.get(field)


def _tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """vLLM passes a tool call's arguments to the template as a dict ({} when not an object)."""
    function = dict(call["function"])
    arguments = function.get("arguments")
    if isinstance(arguments, str) and arguments:
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = {}
    function["arguments"] = arguments if isinstance(arguments, dict) else {}
    return {**call, "function": function}


def content_format(template: str) -> ContentFormat:
    """How vLLM passes message contents to `template` (`_detect_content_format`): as parts when
    the template loops over a message's content, else as one string."""
    import jinja2.nodes
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        ast = _compile_jinja_template(template).environment.parse(template)
    except Exception:  # noqa: BLE001 - vLLM falls back to strings too
        return "string"
    for loop in ast.find_all(jinja2.nodes.For):
        source = loop.iter
        while isinstance(source, jinja2.nodes.Filter | jinja2.nodes.Test) or (
            isinstance(source, jinja2.nodes.Getitem) and isinstance(source.arg, jinja2.nodes.Slice)
        ):
            source = source.node
        if (
            (isinstance(source, jinja2.nodes.Name) and source.name == "content")
            or (isinstance(source, jinja2.nodes.Getattr) and source.attr == "content")
            or (
                isinstance(source, jinja2.nodes.Getitem)
                and isinstance(source.arg, jinja2.nodes.Const)
                and source.arg.value == "content"
            )
        ):
            return "openai"
    return "string"


class Tokenizer:
    def __init__(self, path: str) -> None:
        """`path`: a local directory (or hub id reachable from here) with the served model's
        tokenizer and chat template."""
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._formats: dict[str, ContentFormat] = {}  # per template: requests may bring theirs
        self._segments = self._segment_tokenizer()
        self._special = self._special_ids() if self._segments is not None else None
        self._encoded = 0
        self.verify_every = VERIFY_EVERY

    def _segment_tokenizer(self) -> SegmentTokenizer | None:
        """A cache of the tokenizer's pieces, where it gives exactly the tokenizer's ids on the
        probes; else None, and every text goes through the tokenizer whole."""
        backend = getattr(self._tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        try:
            segments = SegmentTokenizer(backend)
        except ValueError as refusal:
            log.info("tokenizing whole prompts: %s", refusal)
            return None
        for probe in _probes([str(token) for token in self._tokenizer.get_added_vocab()]):
            expected = self._tokenizer.encode(probe, add_special_tokens=False)
            if segments.encode(probe) != expected:
                log.warning("tokenizing whole prompts: pieces differ on %r", probe[:80])
                return None
        return SegmentTokenizer(backend)  # a fresh cache: the probes are nobody's prompts

    def _special_ids(self) -> tuple[list[int], list[int]] | None:
        """The ids the tokenizer adds around a text with special tokens on (BOS, ...), as
        (before, after); None when they are not a plain wrapping."""
        plain = self._tokenizer.encode(_PROBE_TEXT, add_special_tokens=False)
        wrapped = self._tokenizer.encode(_PROBE_TEXT, add_special_tokens=True)
        for start in range(len(wrapped) - len(plain) + 1):
            if wrapped[start : start + len(plain)] == plain:
                return wrapped[:start], wrapped[start + len(plain) :]
        return None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._segments is None or (add_special_tokens and self._special is None):
            return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        ids = self._segments.encode(text)
        self._encoded += 1
        if self._encoded % self.verify_every == 0:
            ids = self._verified(text, ids)
        if add_special_tokens:
            before, after = self._special
            return before + ids + after
        return ids

    def _verified(self, text: str, ids: list[int]) -> list[int]:
        """The tokenizer's own ids for a sampled prompt; a cache that gave other ids is turned
        off for good (routing on wrong hashes finds no prefix anywhere)."""
        expected = self._tokenizer.encode(text, add_special_tokens=False)
        if expected != ids:
            log.error(
                "cached pieces gave other token ids than the tokenizer on a %d-character "
                "prompt; tokenizing whole prompts from now on", len(text)
            )  # fmt: skip
            self._segments = None
        return expected

    def prompt(self, path: str, payload: dict[str, Any]) -> Prompt:
        """A text prompt's tokens (token-id prompts need no tokenizer: `prompt_token_ids`)."""
        text = request_text(path, payload)
        if path.endswith("chat/completions"):
            return Prompt(self.chat_token_ids(payload), text)
        return Prompt(self.encode(text, payload.get("add_special_tokens", True)), text)

    def chat_token_ids(self, payload: dict[str, Any]) -> list[int]:
        tools = payload.get("tools")
        template = self._tokenizer.get_chat_template(payload.get("chat_template"), tools)
        if template not in self._formats:
            self._formats[template] = content_format(template)
        kwargs = {
            key: value
            for key, value in (payload.get("chat_template_kwargs") or {}).items()
            if key not in _RESERVED_KWARGS
        }
        switches = {
            "add_generation_prompt": payload.get("add_generation_prompt", True),
            "continue_final_message": payload.get("continue_final_message", False),
            "documents": payload.get("documents"),
            "reasoning_effort": payload.get("reasoning_effort"),
        }
        kwargs.update((key, value) for key, value in switches.items() if value is not None)
        if switches["reasoning_effort"] is not None and "enable_thinking" not in kwargs:
            kwargs["enable_thinking"] = switches["reasoning_effort"] != "none"
        messages = conversation(payload.get("messages") or [], self._formats[template])
        rendered = self._tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=template, tokenize=False, **kwargs
        )
        return self.encode(rendered, add_special_tokens=False)  # the template has them


_PROBE_TEXT = "Hello, world! 12345 \u00e9t\u00e9\n\n  x\ty "


def _probes(added_tokens: list[str]) -> list[str]:
    """Texts that put every added token against letters, digits, spaces and newlines on both
    sides, and the pieces between them at the very start and end of the text."""
    edges = ["", " ", "\n", "  ", "\n\n", "x", " x ", "1", "é", "\t", ". "]
    probes = [_PROBE_TEXT]
    for token in added_tokens:
        for before in edges:
            probes.append(f"{before}{token}{_PROBE_TEXT}")
            probes.append(f"{_PROBE_TEXT}{before}{token}{before}{token}")
            probes.append(f"{token}{before}user{before}{token}{before}")
    return probes
