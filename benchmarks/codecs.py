"""KV compression codecs on a real model's KV: compression ratio, quality and throughput.

    python benchmarks/codecs.py [--quick] [--out benchmarks/results/codecs.json]
                                [--plot docs/codecs.png]

The KV is SmolLM2-135M-Instruct's (`kvcache.connector.smollm2`: 30 layers, 3 KV heads, head_dim
64, float32) over the six passages of benchmarks/data/codec_eval joined by blank lines (~3.4K
tokens), from one forward pass. A cache stores fp16, so every setting codes that KV cast to fp16
in chunks of 256 tokens (the chunk the connector stores) and is judged on what decodes:
- ratio: the fp16 bytes over the blobs' bytes;
- perplexity: at cuts c = 512, 768, ... while c + 128 fits, the model continues from the KV of
  the first c - 1 tokens, fed tokens c - 1 .. c + 126; the NLL of the 128 tokens it predicts
  against the exact float32 KV's (`ppl_change_pct`), and the mean KL divergence from the exact
  KV's next-token distributions (`kl`, the more sensitive of the two);
- greedy agreement: from the KV of the first c - 1 tokens, c = 512, 1024, ..., 3072, the share
  of 64 greedily generated tokens equal to the exact KV's, position by position (after the first
  difference the runs part ways, so this is harsh and noisy); `forced_agreement` is the share of
  steps of the exact KV's greedy run at which this KV's model picks the same token (teacher
  forcing: a steadier measure of the same thing);
- throughput: encode and decode of one chunk (30 x 2 x 256 x 3 x 64 fp16 values) in GB/s of
  fp16 KV, on the CPU, and on the GPU when there is one. GPU rows repeat the CPU rows' quality
  (the kernels agree bit for bit with the torch reference) and carry the GPU's device-to-device
  copy bandwidth, the ceiling for any codec there.
Two rows calibrate cachegen's key bits per layer and head to an average of 4 (`calibrate.py`):
from the keys' ranges alone, and from each layer's sensitivity in the model (the KL when only
its keys take 3 bits).

Prints a table; writes the rows, and next to them `<out>_run.json` (machine, versions, the exact
KV's perplexity), and plots ratio against perplexity change. `--quick` measures only each codec's
default and writes files only where --out or --plot say.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import transformers

from kvcache.connector import smollm2
from kvcache.kernels import decode, encode
from kvcache.kernels.cachegen import CacheGenCodec
from kvcache.kernels.calibrate import allocate_bits, key_range_weights
from kvcache.kernels.int8 import Int8Codec
from kvcache.kernels.raw import RawCodec

TEXTS = Path(__file__).parent / "data" / "codec_eval"
CHUNK_TOKENS = 256
FIRST_CUT, CUT_STEP, CONTINUATION = 512, 256, 128
GREEDY_CUTS = range(512, 3073, 512)
GREEDY_TOKENS = 64
CALIBRATED_KEY_BITS = 4.0
# Layer sensitivity: the probed layer's keys take PROBE_KEY_BITS, every other key and value
# FINE_BITS. FINE_VALUE_STEP lifts the values' rms floor (step >= value_step * rms), which keeps
# them coarse at any width: at the default 1.0 the values alone cost a KL of 9.5e-3, more than
# any one layer's 3-bit keys add (<= 2.3e-3), and the weights came out nearly flat; at 0.01 the
# step is absmax / 127 and everything but the probed keys costs 3e-5.
PROBE_KEY_BITS, FINE_BITS, FINE_VALUE_STEP = 3, 8, 0.01
GiB = 1 << 30
STARTED = time.perf_counter()

# How a row names its setting, from every constructor argument (defaults filled in).
LABELS = {
    RawCodec: "fp16",
    Int8Codec: "k={key_scales} v={value_scales}",
    CacheGenCodec: "kb={key_bits} vb={value_bits} step={value_step} group={key_group} "
    "anchors={anchor_group} {entropy}",
}


@dataclass(frozen=True)
class Setting:
    """One codec configuration: the class and its constructor's arguments. A calibrated setting
    gets its `key_bits` table at run time, by the named `calibration`."""

    codec: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    calibration: str | None = None

    @property
    def default(self) -> bool:
        """Whether this is what the constructor builds with no arguments."""
        parameters = inspect.signature(self.codec).parameters
        return self.calibration is None and all(
            parameters[name].default == value for name, value in self.kwargs.items()
        )

    @property
    def label(self) -> str:
        parameters = inspect.signature(self.codec).parameters
        arguments = {name: parameter.default for name, parameter in parameters.items()}
        arguments.update(self.kwargs)
        if self.calibration:
            arguments["key_bits"] = f"{self.calibration}@{CALIBRATED_KEY_BITS}"
        return LABELS[self.codec].format(**arguments)


SCALES = ("channel", "token")
SETTINGS = [
    Setting(RawCodec),
    *(Setting(Int8Codec, {"key_scales": k, "value_scales": v}) for k in SCALES for v in SCALES),
    Setting(CacheGenCodec),
    # one knob at a time around the default
    Setting(CacheGenCodec, {"key_bits": 3}),
    Setting(CacheGenCodec, {"key_bits": 5}),
    Setting(CacheGenCodec, {"value_step": 0.6}),
    Setting(CacheGenCodec, {"value_step": 1.0}),
    Setting(CacheGenCodec, {"value_step": 1.3}),
    Setting(CacheGenCodec, {"value_bits": 4}),
    Setting(CacheGenCodec, {"key_group": 32}),
    Setting(CacheGenCodec, {"key_group": 64}),
    Setting(CacheGenCodec, {"key_group": 256}),
    Setting(CacheGenCodec, {"anchor_group": 16}),
    Setting(CacheGenCodec, {"entropy": "zstd"}),
    Setting(CacheGenCodec, {"entropy": "none"}),
    # other corners of the front
    Setting(CacheGenCodec, {"key_group": 64, "value_step": 1.0}),
    Setting(CacheGenCodec, {"key_bits": 5, "key_group": 256}),
    Setting(CacheGenCodec, {"key_bits": 5, "key_group": 256, "value_step": 1.0}),
    Setting(CacheGenCodec, calibration="key-range"),
    Setting(CacheGenCodec, calibration="layer-sensitivity"),
]


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:5.0f} s] {message}", file=sys.stderr, flush=True)


def round_trip(stored: torch.Tensor, codec: Any) -> tuple[torch.Tensor, int]:
    """What a reader gets back from the stored KV coded chunk by chunk, as float32 for the
    model, and the blobs' total bytes."""
    blobs = [encode(chunk, codec) for chunk in stored.split(CHUNK_TOKENS, dim=2)]
    return torch.cat([decode(blob) for blob in blobs], dim=2).float(), sum(map(len, blobs))


@dataclass(frozen=True)
class Quality:
    ppl_change_pct: float
    kl: float
    greedy_agreement: float
    forced_agreement: float


class Judge:
    """Scores a KV by how the model continues from it, against the exact KV's continuations
    (computed once, here)."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, exact: torch.Tensor) -> None:
        self.model, self.ids = model, ids
        tokens = ids.shape[1]
        self.cuts = range(FIRST_CUT, tokens - CONTINUATION + 1, CUT_STEP)
        self.greedy_cuts = [cut for cut in GREEDY_CUTS if cut < tokens]
        self.targets = torch.cat([ids[0, cut : cut + CONTINUATION] for cut in self.cuts])
        self.exact_log_probs = self.log_probs(exact)
        self.exact_nll = self.nll(self.exact_log_probs)
        self.exact_greedy = self.greedy(exact)

    def log_probs(self, kv: torch.Tensor) -> torch.Tensor:
        """`[positions, vocabulary]`: the next-token log-probabilities at every perplexity cut."""
        parts = []
        for cut in self.cuts:
            fed = self.ids[:, cut - 1 : cut - 1 + CONTINUATION]
            logits = self.model(fed, past_key_values=smollm2.cache_of(kv, cut - 1)).logits
            parts.append(torch.log_softmax(logits[0].float(), dim=-1))
        return torch.cat(parts)

    def nll(self, log_probs: torch.Tensor) -> float:
        return -log_probs.gather(1, self.targets[:, None]).mean().item()

    def kl(self, log_probs: torch.Tensor) -> float:
        """Mean KL(exact || this) of the next-token distributions."""
        exact = self.exact_log_probs
        return (exact.exp() * (exact - log_probs)).sum(dim=-1).mean().item()

    def greedy(self, kv: torch.Tensor) -> torch.Tensor:
        """`[cuts, GREEDY_TOKENS]`: the tokens greedy decoding picks from each greedy cut."""
        runs = []
        for cut in self.greedy_cuts:
            cache = smollm2.cache_of(kv, cut - 1)
            token, picked = self.ids[:, cut - 1 : cut], []
            for _ in range(GREEDY_TOKENS):
                token = self.model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
                picked.append(token)
            runs.append(torch.cat(picked, dim=1)[0])
        return torch.stack(runs)

    def forced(self, kv: torch.Tensor) -> torch.Tensor:
        """`[cuts, GREEDY_TOKENS]`: the tokens this KV's model would pick at each step of the
        exact KV's greedy continuation (teacher forcing: one divergence does not end the run)."""
        runs = []
        for cut, exact in zip(self.greedy_cuts, self.exact_greedy):
            fed = torch.cat([self.ids[0, cut - 1 : cut], exact[:-1]])[None]
            runs.append(
                self.model(fed, past_key_values=smollm2.cache_of(kv, cut - 1)).logits[0].argmax(-1)
            )
        return torch.stack(runs)

    def quality(self, kv: torch.Tensor) -> Quality:
        log_probs = self.log_probs(kv)
        change = 100 * math.expm1(self.nll(log_probs) - self.exact_nll)
        agreement = (self.greedy(kv) == self.exact_greedy).float().mean().item()
        forced = (self.forced(kv) == self.exact_greedy).float().mean().item()
        return Quality(change, self.kl(log_probs), agreement, forced)


def layer_sensitivity(stored: torch.Tensor, judge: Judge) -> torch.Tensor:
    """`[layers, heads]`: for each layer the KL when only its keys are coarse; a layer's heads
    share its weight."""
    layers, heads = stored.shape[0], stored.shape[3]
    weights = torch.empty(layers, heads)
    for layer in range(layers):
        key_bits = [FINE_BITS] * layers
        key_bits[layer] = PROBE_KEY_BITS
        probe = CacheGenCodec(key_bits, value_bits=FINE_BITS, value_step=FINE_VALUE_STEP)
        coded, _ = round_trip(stored, probe)
        weights[layer] = judge.kl(judge.log_probs(coded))
    return weights


def calibrate(setting: Setting, stored: torch.Tensor, judge: Judge) -> tuple[Setting, dict]:
    """The setting with its key bit table, and what the calibration found and cost."""
    started = time.perf_counter()
    if setting.calibration == "key-range":
        weights = key_range_weights(stored.split(CHUNK_TOKENS, dim=2))
    else:
        weights = layer_sensitivity(stored, judge)
    bits = allocate_bits(weights, CALIBRATED_KEY_BITS).tolist()
    seconds = time.perf_counter() - started
    log(f"calibration by {setting.calibration}: {seconds:.1f} s")
    found = {
        "method": setting.calibration,
        "average_key_bits": CALIBRATED_KEY_BITS,
        "key_bits": bits,
        "weights": [[float(f"{w:.4g}") for w in layer] for layer in weights.tolist()],
        "seconds": round(seconds, 1),
    }
    return replace(setting, kwargs={**setting.kwargs, "key_bits": bits}), found


def median_seconds(call: Callable[[], object], synchronize: Callable[[], None]) -> float:
    """The median time of `call` after one warm-up, over at least 5 runs and 0.5 s."""
    call()
    synchronize()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - started < 0.5:
        begin = time.perf_counter()
        call()
        synchronize()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def throughput(codec: Any, chunk: torch.Tensor, device: str) -> tuple[float, float]:
    """Encode and decode GB/s of fp16 KV, one chunk at a time on `device`."""
    chunk = chunk.to(device)
    synchronize = torch.cuda.synchronize if chunk.is_cuda else lambda: None
    blob = encode(chunk, codec)
    encode_s = median_seconds(lambda: encode(chunk, codec), synchronize)
    decode_s = median_seconds(lambda: decode(blob, device=device), synchronize)
    fp16_bytes = chunk.numel() * 2
    return fp16_bytes / encode_s / 1e9, fp16_bytes / decode_s / 1e9


def copy_gbps() -> float:
    """The GPU's device-to-device copy bandwidth over 1 GiB, bytes read plus written."""
    source = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    return 2 * GiB / median_seconds(lambda: target.copy_(source), torch.cuda.synchronize) / 1e9


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    log("loading SmolLM2-135M-Instruct")
    tokenizer, model = smollm2.load()
    text = "\n\n".join(path.read_text() for path in sorted(TEXTS.glob("*.txt")))
    ids = tokenizer(text, return_tensors="pt").input_ids
    log(f"exact KV of {ids.shape[1]} tokens and its continuations")
    exact = smollm2.kv_of(model(ids, use_cache=True).past_key_values)
    stored = exact.half()
    judge = Judge(model, ids, exact)
    chunk = stored[:, :, :CHUNK_TOKENS].contiguous()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    hbm_gbps = copy_gbps() if gpu else None
    settings = [s for s in SETTINGS if s.default] if args.quick else SETTINGS
    if args.match:
        chosen = [s for s in settings if any(m in f"{s.codec.name} {s.label}" for m in args.match)]
        settings = chosen
    rows = []
    for setting in settings:
        log(f"{setting.codec.name} {setting.label}")
        calibration = None
        if setting.calibration:
            setting, calibration = calibrate(setting, stored, judge)
        codec = setting.codec(**setting.kwargs)
        coded, blob_bytes = round_trip(stored, codec)
        quality = judge.quality(coded)
        for device in ["cpu", "cuda"] if gpu else ["cpu"]:
            encode_gbps, decode_gbps = throughput(codec, chunk, device)
            row = {
                "codec": codec.name,
                "setting": setting.label,
                "default": setting.default,
                "ratio": round(stored.numel() * 2 / blob_bytes, 3),
                "ppl_change_pct": round(quality.ppl_change_pct, 4),
                "greedy_agreement": round(quality.greedy_agreement, 4),
                "encode_gbps": round(encode_gbps, 3),
                "decode_gbps": round(decode_gbps, 3),
                "device": gpu if device == "cuda" else "cpu",
                "kl": float(f"{quality.kl:.4g}"),
                "forced_agreement": round(quality.forced_agreement, 4),
                "bits_per_element": round(blob_bytes * 8 / stored.numel(), 3),
            }
            if device == "cuda":
                row["hbm_copy_gbps"] = round(hbm_gbps, 1)
                row["decode_of_hbm_copy"] = round(decode_gbps / hbm_gbps, 4)
            if calibration:
                row["calibration"] = calibration
            rows.append(row)
    exact_ppl = math.exp(judge.exact_nll)
    log(f"done; exact KV perplexity {exact_ppl:.3f}")
    about = {
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "command": " ".join(sys.argv),
        "seconds": round(time.perf_counter() - STARTED),
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "gpu": gpu,
            "hbm_copy_gbps": round(hbm_gbps, 1) if hbm_gbps else None,
        },
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32)",
        "tokens": ids.shape[1],
        "chunk_tokens": CHUNK_TOKENS,
        "exact_perplexity": round(exact_ppl, 4),
        "perplexity_cuts": list(judge.cuts),
        "continuation_tokens": CONTINUATION,
        "greedy_cuts": judge.greedy_cuts,
        "greedy_tokens": GREEDY_TOKENS,
    }
    return rows, about


def print_table(rows: list[dict]) -> None:
    header = ["codec", "setting", "default", "ratio", "bits/el", "ppl change %", "KL",
              "greedy", "forced", "encode GB/s", "decode GB/s", "device"]  # fmt: skip
    lines = [
        [row["codec"], row["setting"], "yes" if row["default"] else "", f"{row['ratio']:.2f}",
         f"{row['bits_per_element']:.2f}", f"{row['ppl_change_pct']:+.3f}", f"{row['kl']:.2e}",
         f"{row['greedy_agreement']:.3f}", f"{row['forced_agreement']:.3f}",
         f"{row['encode_gbps']:.3f}",
         f"{row['decode_gbps']:.3f}", row["device"]]
        for row in rows
    ]  # fmt: skip
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    print()
    aligns = [str.ljust, str.ljust] + [str.rjust] * (len(header) - 2)
    for line in [header, *lines]:
        print("  ".join(align(cell, width) for align, cell, width in zip(aligns, line, widths)))


def pareto_front(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both ratio and perplexity change, by ratio."""
    front: list[dict] = []
    for row in sorted(rows, key=lambda r: (-r["ratio"], r["ppl_change_pct"])):
        if not front or row["ppl_change_pct"] < front[-1]["ppl_change_pct"]:
            front.append(row)
    return front[::-1]


def plot(rows: list[dict], about: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cpu_rows = [row for row in rows if row["device"] == "cpu"]
    figure, axes = plt.subplots(figsize=(15, 7))
    figure.subplots_adjust(right=0.62)
    colors = dict(zip(dict.fromkeys(row["codec"] for row in cpu_rows), "kbr"))
    key = []
    # Settings sit too close for their names: each point gets a number, named beside the plot.
    for number, row in enumerate(cpu_rows, start=1):
        point, color = (row["ratio"], row["ppl_change_pct"]), colors[row["codec"]]
        marker, size = ("*", 120) if row["default"] else ("o", 30)
        axes.scatter(*point, color=color, marker=marker, s=size, zorder=3)
        axes.annotate(str(number), point, fontsize=7, color=color, textcoords="offset points",
                      xytext=(4, 3 if number % 2 else -9))  # fmt: skip
        default = " (default)" if row["default"] else ""
        key.append(f"{number:2d}  {row['codec']} {row['setting']}{default}")
    figure.text(0.64, 0.88, "\n".join(key), fontsize=8, family="monospace", va="top")
    for codec, color in colors.items():
        axes.scatter([], [], color=color, label=codec)
    front = pareto_front(cpu_rows)
    axes.plot(
        [r["ratio"] for r in front],
        [r["ppl_change_pct"] for r in front],
        "g--",
        linewidth=0.8,
        label="Pareto front",
        zorder=2,
    )
    for level in (1.0, 0.2):
        axes.axhline(level, color="grey", linestyle=":", linewidth=0.8)
    axes.axvline(5.0, color="grey", linestyle=":", linewidth=0.8)
    axes.set_yscale("symlog", linthresh=0.1)  # int8's ~0.03% and cachegen's ~1% both show
    axes.margins(x=0.12, y=0.08)
    axes.set_xlabel("compression ratio vs fp16")
    axes.set_ylabel("perplexity change % (symlog)")
    axes.text(
        0.99,
        0.01,
        "stars: each codec's default",
        transform=axes.transAxes,
        ha="right",
        fontsize=7,
    )
    axes.set_title(
        f"KV codecs on {about['model']}, {about['tokens']} tokens in "
        f"{about['chunk_tokens']}-token chunks"
    )
    axes.legend(loc="upper left")
    axes.grid(alpha=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only each codec's default")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/codecs.json")
    parser.add_argument("--plot", default=None, help="default: docs/codecs.png")
    parser.add_argument(
        "--match",
        action="append",
        default=[],
        help="only settings whose 'codec setting' contains this (repeatable)",
    )
    args = parser.parse_args()
    with torch.inference_mode():
        rows, about = run(args)
    print_table(rows)
    print(f"\nexact KV perplexity {about['exact_perplexity']:.3f} over {about['tokens']} tokens")
    partial = args.quick or args.match
    out = args.out or (None if partial else "benchmarks/results/codecs.json")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(rows, indent=1) + "\n")
        about_path = Path(out).with_name(f"{Path(out).stem}_run.json")
        about_path.write_text(json.dumps(about, indent=1) + "\n")
        print(f"wrote {out} and {about_path}")
    figure = args.plot or (None if partial else "docs/codecs.png")
    if figure is not None:
        plot(rows, about, figure)
        print(f"wrote {figure}")


if __name__ == "__main__":
    sys.exit(main())
