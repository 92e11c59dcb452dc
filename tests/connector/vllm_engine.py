"""One real vLLM engine (CPU build) with `KVCacheConnector` in its own process, for the adapter's
tests: generates greedy tokens for each prompt in turn and writes what vLLM reports.

    python vllm_engine.py MODEL_DIR PROMPTS_JSON OUT_JSON --members M [--codec C]

PROMPTS_JSON is a list of {"tokens": [...], "salt": optional cache_salt, "reset": empty vLLM's
own prefix cache first}; OUT_JSON gets one
{"tokens", "num_cached_tokens"} per prompt.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("prompts")
    parser.add_argument("out")
    parser.add_argument("--members", default="", help="none: the local tier alone")
    parser.add_argument("--codec", default="none")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    transfer = {
        "kv_connector": "KVCacheConnector",
        "kv_connector_module_path": "kvcache.connector.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "members": args.members,
            "codec": args.codec,
            "model": "tiny-llama",
        },
    }
    llm = LLM(
        model=args.model,
        skip_tokenizer_init=True,
        dtype="float32",
        enable_prefix_caching=True,
        max_model_len=4096,
        kv_cache_memory_bytes=64 << 20,
        kv_transfer_config=transfer,
    )
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    results = []
    for prompt in json.loads(Path(args.prompts).read_text()):
        if prompt.get("reset"):
            assert llm.reset_prefix_cache()
        tokens = TokensPrompt(prompt_token_ids=prompt["tokens"])
        if prompt.get("salt"):
            tokens["cache_salt"] = prompt["salt"]
        (output,) = llm.generate([tokens], sampling)
        results.append(
            {
                "tokens": list(output.outputs[0].token_ids),
                "num_cached_tokens": output.num_cached_tokens,
            }
        )
    Path(args.out).write_text(json.dumps(results))
    llm.llm_engine.engine_core.shutdown()  # the connector drains its store queue on shutdown


if __name__ == "__main__":
    main()
