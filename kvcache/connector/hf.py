"""The transformers adapter: greedy generation for a causal LM (DynamicCache) with its prompt's
cached prefix loaded through the connector instead of prefilled.

At least the prompt's last token is always computed (the model needs it to give the first
logits), so the lookup is capped one token short of the prompt. After prefill the prompt's new
full chunks go to the store worker, before generation starts: storing never delays the first
token, only the worker's queue.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from kvcache.connector.core import Connector
from kvcache.connector.smollm2 import cache_of, kv_of


@dataclass
class Generation:
    tokens: list[int]
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV was loaded instead of computed
    ttft_s: float  # from the call to the first generated token
    first_logits: torch.Tensor  # the logits that chose the first token


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    connector: Connector | None,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    store: bool = True,
) -> Generation:
    """Greedy tokens after `prompt_ids`; `connector` None is plain full prefill."""
    if not prompt_ids or max_new_tokens < 1:
        raise ValueError("generate needs a prompt and at least one new token")
    started = time.perf_counter()
    cache, cached = DynamicCache(), 0
    if connector is not None:
        hit = connector.lookup(prompt_ids, max_tokens=len(prompt_ids) - 1)
        kv = connector.load(hit) if hit.chunks else None
        if kv is not None:
            cache, cached = cache_of(kv.to(model.dtype)), kv.shape[2]
    fed = torch.tensor([list(prompt_ids[cached:])])
    output = model(fed, past_key_values=cache)
    first_logits = output.logits[0, -1].float()
    token = int(first_logits.argmax())
    ttft = time.perf_counter() - started
    if connector is not None and store:
        connector.store(prompt_ids, kv_of(output.past_key_values), cached)
    tokens = [token]
    while len(tokens) < max_new_tokens:
        output = model(torch.tensor([[token]]), past_key_values=output.past_key_values)
        token = int(output.logits[0, -1].argmax())
        tokens.append(token)
    return Generation(tokens, len(prompt_ids), cached, ttft, first_logits)
