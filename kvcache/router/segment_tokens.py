"""Token ids of rendered prompts, remembered per segment, so a prompt the router has mostly seen
costs dictionary lookups instead of a tokenizer pass (~1-2 µs per token on a server CPU).

A Hugging Face tokenizer cuts its input at its added tokens (`<|im_start|>`, `<|im_end|>`, ...)
before it normalizes, pre-tokenizes and runs the model, and each piece between them is tokenized
on its own. A rendered chat is mostly such pieces: the system prompt, each earlier turn. So the
ids of a whole text are the ids of its pieces, in order, with each added token's id between them,
and a piece seen before needs no tokenizer. Pieces not seen before are tokenized together in one
batch (on the tokenizer's own threads).

That holds only where a piece's ids do not depend on where it sits. `separable` refuses the
tokenizers where they do, and the tokenizer falls back to whole texts:
- added tokens that strip the whitespace beside them (`lstrip`/`rstrip`) or match only whole
  words (`single_word`): the piece's edges then depend on its neighbours;
- added tokens matched after normalization, with a normalizer that could change the text;
- a `Metaspace` pre-tokenizer with `prepend_scheme="first"` (Llama 2, Mistral): it marks only the
  piece at the start of the text;
- `encode_special_tokens`, where special tokens are not cut out at all.
Where the tokenizer passes, the caller checks it further on probe texts against the tokenizer it
wraps (`Tokenizer` does, with transformers' own encoding) before trusting it.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer as Backend

DEFAULT_CAPACITY_CHARS = 32 * 1024 * 1024  # of cached piece text; ids take ~1/4 as many entries


def separable(backend: Backend) -> str | None:
    """Why `backend`'s pieces between added tokens cannot be tokenized apart; None when they can."""
    config = json.loads(backend.to_str())
    if backend.encode_special_tokens:
        return "special tokens are encoded as text (encode_special_tokens)"
    for token in config.get("added_tokens") or []:
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            return f"added token {token['content']!r} strips or matches words"
        if token.get("normalized") and config.get("normalizer") is not None:
            return f"added token {token['content']!r} is matched after normalization"
    if _prepends_first(config.get("pre_tokenizer")):
        return "a Metaspace pre-tokenizer marks only the start of the text"
    return None


def _prepends_first(pre_tokenizer: dict[str, Any] | None) -> bool:
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any(_prepends_first(step) for step in pre_tokenizer.get("pretokenizers", []))
    return (
        pre_tokenizer.get("type") == "Metaspace" and pre_tokenizer.get("prepend_scheme") == "first"
    )


class SegmentTokenizer:
    """`encode(text)` == `backend.encode(text, add_special_tokens=False).ids`, from cached pieces.

    The cache holds up to `capacity_chars` of piece text, least recently used out first; a piece
    longer than an eighth of that is tokenized every time rather than flushing the cache."""

    def __init__(self, backend: Backend, capacity_chars: int = DEFAULT_CAPACITY_CHARS) -> None:
        refusal = separable(backend)
        if refusal is not None:
            raise ValueError(f"this tokenizer cannot be cached per segment: {refusal}")
        self._backend = backend
        added = sorted(
            (token.content for token in backend.get_added_tokens_decoder().values()),
            key=len,
            reverse=True,  # leftmost-longest, as the tokenizer's own matcher
        )
        self._added_ids = {content: backend.token_to_id(content) for content in added}
        self._split = re.compile("(" + "|".join(map(re.escape, added)) + ")") if added else None
        self._pieces: OrderedDict[str, list[int]] = OrderedDict()
        self._cached_chars = 0
        self.capacity_chars = capacity_chars

    def encode(self, text: str) -> list[int]:
        # re.split with one group: text pieces at even positions, added tokens at odd ones
        parts = self._split.split(text) if self._split is not None else [text]
        cached, missing = self._pieces, []
        for position in range(0, len(parts), 2):
            piece = parts[position]
            if piece and piece not in cached:
                missing.append(piece)
        fresh: dict[str, list[int]] = {}
        if len(missing) == 1:  # on this thread: a batch hands even one text to a worker pool
            fresh = {missing[0]: self._backend.encode(missing[0], add_special_tokens=False).ids}
        elif missing:
            unique = list(dict.fromkeys(missing))
            encodings = self._backend.encode_batch_fast(unique, add_special_tokens=False)
            fresh = {piece: encoding.ids for piece, encoding in zip(unique, encodings)}
        ids: list[int] = []
        for position, part in enumerate(parts):
            if position % 2:
                ids.append(self._added_ids[part])
            elif part:
                piece_ids = fresh.get(part)
                if piece_ids is None:
                    piece_ids = cached[part]
                    cached.move_to_end(part)
                ids.extend(piece_ids)
        for piece, piece_ids in fresh.items():
            self._remember(piece, piece_ids)
        return ids

    def _remember(self, piece: str, ids: list[int]) -> None:
        if len(piece) > self.capacity_chars // 8:
            return
        self._pieces[piece] = ids
        self._cached_chars += len(piece)
        while self._cached_chars > self.capacity_chars:
            evicted, _ = self._pieces.popitem(last=False)
            self._cached_chars -= len(evicted)

    @property
    def cached_chars(self) -> int:
        return self._cached_chars
