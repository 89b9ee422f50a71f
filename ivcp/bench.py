"""Efficiency benchmark: KV cache, prefill, decode, total time, peak memory and selection time per
method, beside the analytic limit (see :mod:`ivcp.analytic`).

All methods run in one process on the same inputs, interleaved (the order rotates every repeat) so
drift hits all alike, after warm-up runs; each figure is the median of the repeats with min and max.
On CUDA, forward passes are timed with CUDA events and the selection with synchronisation. Models
built from bundled architecture configs have random weights: speed does not depend on the values.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import analytic
from .compat import output_cache
from .adapters.qwen2_5_vl import smart_resize  # noqa: F401  (bench.smart_resize: the resize rule the inputs follow)

VANILLA = "vanilla"


# --- models and inputs -------------------------------------------------------------------------

def bundled_architectures() -> list[str]:
    from .config import config_names

    return config_names("architectures", ".json")


def random_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.bfloat16, attn: str = "sdpa"):
    """A model of a bundled architecture with random weights, built directly on ``device``."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from . import models  # noqa: F401  (registers ivcp's own model classes with the Auto classes)
    from .config import config_file

    path = config_file("architectures", f"{name}.json")
    if not path.is_file():
        raise ValueError(f"unknown model {name!r}: not 'tiny', a checkpoint directory, or one of the bundled "
                         f"architectures ({', '.join(bundled_architectures())})")
    spec = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    config = AutoConfig.for_model(**spec)
    for sub in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        if sub is not None:
            sub._attn_implementation = attn
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    return model.eval()


def synthetic_inputs(model, image_size: tuple[int, int], prompt_tokens: int = 32, system_tokens: int = 20,
                     seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Chat-shaped inputs with one image of ``image_size`` (H, W) pixels, built from the config alone
    (no tokenizer, no processor): random text ids, random pixels of the right shape (the family's
    adapter lays them out)."""
    from .adapters import adapter_for

    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(seed)
    vocab = getattr(model.config, "text_config", model.config).vocab_size
    specials = torch.tensor(sorted(adapter.special_token_ids))
    low, high = (32, 127) if vocab < 1000 else (1000, min(vocab, 150000))

    def text(n):
        ids = torch.empty(0, dtype=torch.long)
        while ids.numel() < n:  # exactly n ids, none of them special (rows of a batch get the same length)
            draw = torch.randint(low, high, (n,), generator=g)
            ids = torch.cat([ids, draw[~torch.isin(draw, specials)]])
        return ids[:n]

    inputs = adapter.synthetic_inputs(image_size, text(system_tokens), text(prompt_tokens), g)
    return {k: v.to(device, dtype) if k.startswith("pixel_values") else v.to(device) for k, v in inputs.items()}


def synthetic_batch(model, image_size: tuple[int, int], batch: int, prompt_tokens: int = 32, seed: int = 0,
                    device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """``batch`` rows of :func:`synthetic_inputs` (each its own random text and pixels, seeds ``seed``,
    ``seed + 1``, …), left-padded into one batch as the family's processor would."""
    from .batching import collate

    if batch < 1:
        raise ValueError(f"batch sizes must be positive, got {batch}")
    if batch == 1:
        return synthetic_inputs(model, image_size, prompt_tokens, seed=seed, device=device, dtype=dtype)
    text = getattr(model.config, "text_config", model.config)
    pad = getattr(text, "pad_token_id", None)
    rows = [synthetic_inputs(model, image_size, prompt_tokens, seed=seed + i, device=device, dtype=dtype)
            for i in range(batch)]
    return collate(rows, pad if pad is not None else 0)


def visual_tokens_to_size(tokens: int, cell: int = 28) -> tuple[int, int]:
    """An image size (H, W) whose merged grid holds about ``tokens`` tokens (4:3 when it can)."""
    rows = max(1, round(math.sqrt(tokens * 3 / 4)))
    cols = max(1, round(tokens / rows))
    return rows * cell, cols * cell


# --- timing -------------------------------------------------------------------------------------

class _Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


class _ForwardTimer:
    """Times every top-level forward (CUDA events on GPU, perf_counter on CPU) without syncing."""

    def __init__(self, model, clock: _Clock):
        self.clock, self.marks = clock, []
        self.handles = [model.register_forward_pre_hook(lambda *a: self._mark()),
                        model.register_forward_hook(lambda *a: self._mark())]

    def _mark(self):
        if self.clock.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        for handle in self.handles:
            handle.remove()
        self.clock.sync()
        pairs = zip(self.marks[0::2], self.marks[1::2])
        if self.clock.cuda:
            return [start.elapsed_time(end) / 1000 for start, end in pairs]
        return [end - start for start, end in pairs]


def _layer_tokens(record, n_layers: int, lengths: list[int]) -> tuple[list[list[int]], list[list[int]]]:
    """Per batch row: (tokens each layer processes in prefill, KV entries each layer holds after it).
    ``lengths``: each row's prompt length without padding (for runs without a record)."""
    if record is None:
        return [[n] * n_layers for n in lengths], [[n] * n_layers for n in lengths]
    processed, cached = [], []
    for row, n in zip(record, lengths):
        counts = []
        for layer in range(n_layers):
            count = n
            for stage in row.stages:
                if stage["layer"] <= layer:
                    count = int(stage["kept"].numel())
            counts.append(count)
        processed.append(counts)
        cached.append(list(row.kv_lengths))
    return processed, cached


def run_once(model, inputs: dict, method: str, params: dict, new_tokens: int) -> dict:
    """One measured run of a method: prefill alone, then generate ``new_tokens`` (for every row of the batch)."""
    import ivcp

    device = next(model.parameters()).device
    clock = _Clock(device)
    context = contextlib.nullcontext(None) if method == VANILLA else \
        ivcp.prune(model, method, sync_timing=True, **params)
    with torch.no_grad(), context as session:
        start = clock.now()
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        prefill = clock.now() - start
        cache = output_cache(out)
        kv_per_layer = [int(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size())
                        for l in cache.layers]
        bytes_per_value = cache.layers[0].keys.element_size()
        record = session.last if session is not None else None
        del out, cache
        if clock.cuda:
            torch.cuda.reset_peak_memory_stats()
        timer = _ForwardTimer(model, clock)
        start = clock.now()
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        total = clock.now() - start
        forwards = timer.durations()
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    lengths = (mask.sum(1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])).tolist()
    n_visual = int((ids == model.config.image_token_id).sum())
    processed, cached = _layer_tokens(record, len(kv_per_layer), [int(n) for n in lengths])
    return {
        "batch": ids.shape[0],
        "prefill_s": prefill,
        "decode_s_per_token": statistics.fmean(forwards[1:]) if len(forwards) > 1 else float("nan"),
        "total_s": total,
        "selection_s": record.selection_seconds if record is not None else 0.0,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if clock.cuda else None,
        "kv_bytes_per_layer": kv_per_layer,
        "bytes_per_value": bytes_per_value,
        "n_visual": n_visual,
        "n_visual_kept": sum(row.n_visual_kept for row in record) if record is not None else n_visual,
        "visual_kv_share": record.visual_kv_share if record is not None else 1.0,
        "processed_per_row": processed,
        "cached_per_row": cached,
        "seq_len": ids.shape[1],
        "new_tokens": new_tokens,
    }


# --- the benchmark --------------------------------------------------------------------------------

@dataclass
class Case:
    """One row of the report: a method with parameters on one input size."""

    method: str
    params: dict[str, Any]
    image_size: tuple[int, int]
    batch: int = 1
    samples: list[dict] = field(default_factory=list)
    out_of_memory: bool = False

    @property
    def label(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.method}({extra})" if extra else self.method


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "samples": values}


def plan(methods: list[str], keep_ratios: list[float] | None, image_sizes: list[tuple[int, int]],
         batch_sizes: list[int] | None = None) -> list[Case]:
    """Cases: each method at each image size (and batch size); methods with a keep_ratio at each asked ratio."""
    from .methods import method_class

    for method in methods:
        if method != VANILLA:
            method_class(method)  # a clear error for an unknown name
    for ratio in keep_ratios or []:
        if not 0 <= ratio <= 1:
            raise ValueError(f"keep ratios must be in [0, 1], got {ratio}")
    batch_sizes = batch_sizes or [1]
    if any(not isinstance(b, int) or b < 1 for b in batch_sizes) or len(set(batch_sizes)) != len(batch_sizes):
        raise ValueError(f"batch sizes must be distinct positive integers, got {batch_sizes}")
    cases = []
    for size in image_sizes:
        for batch in sorted(batch_sizes):
            for method in methods:
                has_ratio = method != VANILLA and "keep_ratio" in method_class(method).__dataclass_fields__
                for ratio in (keep_ratios if keep_ratios and has_ratio else [None]):
                    cases.append(Case(method, {} if ratio is None else {"keep_ratio": ratio}, size, batch))
    return cases


def run(model, cases: list[Case], repeats: int = 3, warmup: int = 1, new_tokens: int = 16, prompt_tokens: int = 32,
        seed: int = 0, log=print, rounds=None) -> list[Case]:
    """Measure every case ``repeats`` times after ``warmup`` rounds, interleaved and rotated. On a GPU a case
    that runs out of memory is marked and not run again (nor are its larger batches). ``rounds`` may wrap
    the rounds' range (a progress bar)."""
    import ivcp

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    for case in cases:  # bad names and parameters fail before any compute
        if case.method != VANILLA:
            ivcp.resolve_method(model, case.method, **case.params)
    inputs = {(size, batch): synthetic_batch(model, size, batch, prompt_tokens, seed=seed, device=str(device),
                                             dtype=dtype)
              for size, batch in {(c.image_size, c.batch) for c in cases}}
    torch.manual_seed(seed)
    for round_index in (rounds or iter)(range(warmup + repeats)):
        shift = round_index % len(cases)
        for case in cases[shift:] + cases[:shift]:
            if case.out_of_memory:
                continue
            try:
                sample = run_once(model, inputs[(case.image_size, case.batch)], case.method, case.params, new_tokens)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                for other in cases:
                    if (other.label, other.image_size) == (case.label, case.image_size) and other.batch >= case.batch:
                        other.out_of_memory, other.samples = True, []
                log(f"{case.label} at batch {case.batch}: out of memory")
                continue
            if round_index >= warmup:
                case.samples.append(sample)
        log(f"round {round_index + 1}/{warmup + repeats}{' (warm-up)' if round_index < warmup else ''} done")
    return cases


def summarise(model, cases: list[Case], prompt_tokens: int = 32, seed: int = 0) -> list[dict]:
    """Medians, KV bytes measured and analytic, FLOPs and the ideal ratios against vanilla (at the same
    image size and batch size); throughput per batch. Cases that ran out of memory are left out."""
    from .adapters import adapter_for

    adapter = adapter_for(model)
    text = analytic.TextArch.from_config(model.config)
    rows = []
    baselines: dict[tuple, dict] = {}
    for case in cases:
        if not case.samples:
            continue
        first = case.samples[0]
        bpv = first["bytes_per_value"]
        new_tokens = first["new_tokens"]
        vision_flops = case.batch * adapter.vision_flops(synthetic_inputs(model, case.image_size, prompt_tokens, seed=seed))
        llm_flops = sum(analytic.llm_prefill_flops(text, p) for p in first["processed_per_row"])
        decode_steps = [sum(analytic.llm_decode_flops(text, [c + 1 + t for c in cached]) for cached in first["cached_per_row"])
                        for t in range(new_tokens - 1)]  # the prefill gives the first token
        decode_cache = [c + 1 for cached in first["cached_per_row"] for c in cached]
        row = {
            "method": case.method, "params": case.params, "label": case.label, "image_size": list(case.image_size),
            "batch": case.batch, "new_tokens": new_tokens,
            "seq_len": first["seq_len"], "n_visual": first["n_visual"], "n_visual_kept": first["n_visual_kept"],
            "visual_kv_share": first["visual_kv_share"],
            "kv_bytes_per_layer": first["kv_bytes_per_layer"], "kv_bytes": sum(first["kv_bytes_per_layer"]),
            "kv_bytes_analytic": sum(analytic.kv_bytes(text, cached, bpv) for cached in first["cached_per_row"]),
            "kv_bytes_per_sequence_final": max(analytic.kv_bytes(text, [c + new_tokens for c in cached], bpv)
                                               for cached in first["cached_per_row"]),
            "prefill_ms": _stats([s["prefill_s"] * 1e3 for s in case.samples]),
            "decode_ms_per_token": _stats([s["decode_s_per_token"] * 1e3 for s in case.samples]),
            "total_ms": _stats([s["total_s"] * 1e3 for s in case.samples]),
            "selection_ms": _stats([s["selection_s"] * 1e3 for s in case.samples]),
            "tokens_per_s": _stats([case.batch * new_tokens / s["total_s"] for s in case.samples]),
            "samples_per_s": _stats([case.batch / s["total_s"] for s in case.samples]),
            "peak_memory_bytes": first["peak_memory_bytes"],
            "flops_vision": vision_flops, "flops_llm_prefill": llm_flops,
            "flops_generate": vision_flops + llm_flops + sum(decode_steps),
            "decode_bytes_per_token": text.weight_count * bpv + analytic.kv_bytes(text, decode_cache, bpv),
        }
        if case.method == VANILLA:
            baselines[(case.image_size, case.batch)] = row
        rows.append(row)
    for row in rows:
        base = baselines.get((tuple(row["image_size"]), row["batch"]))
        if base is None:
            continue
        ideal_prefill = (base["flops_vision"] + base["flops_llm_prefill"]) / (row["flops_vision"] + row["flops_llm_prefill"])
        measured_prefill = base["prefill_ms"]["median"] / row["prefill_ms"]["median"]
        ideal_decode = row["decode_bytes_per_token"] / base["decode_bytes_per_token"]
        measured_decode = row["decode_ms_per_token"]["median"] / base["decode_ms_per_token"]["median"]
        row.update(ideal_prefill_speedup=ideal_prefill, measured_prefill_speedup=measured_prefill,
                   prefill_speedup_vs_ideal=measured_prefill / ideal_prefill,
                   ideal_decode_ratio=ideal_decode, measured_decode_ratio=measured_decode,
                   selection_share_of_prefill=row["selection_ms"]["median"] / row["prefill_ms"]["median"],
                   measured_throughput_ratio=row["tokens_per_s"]["median"] / base["tokens_per_s"]["median"],
                   ideal_throughput_ratio=base["flops_generate"] / row["flops_generate"])
    return rows


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def capacity(rows: list[dict], weights: int, memory_budget_bytes: int) -> list[dict]:
    """Per method (and image size): the largest batch that fits ``memory_budget_bytes``. Analytic: the
    weights plus each sequence's KV cache at the end of its answer (activations left out, so an upper
    bound); measured (where peak memory was recorded at two or more batch sizes): a straight line through
    the peak memory against the batch size (least squares), solved for the budget."""
    out = []
    for key in dict.fromkeys((r["label"], tuple(r["image_size"])) for r in rows):
        mine = sorted((r for r in rows if (r["label"], tuple(r["image_size"])) == key), key=lambda r: r["batch"])
        per_sequence = mine[0]["kv_bytes_per_sequence_final"]
        analytic_max = max(0, (memory_budget_bytes - weights) // per_sequence) if per_sequence else None
        points = [(r["batch"], r["peak_memory_bytes"]) for r in mine if r["peak_memory_bytes"] is not None]
        measured_max = None
        if len({b for b, _ in points}) >= 2:
            n = len(points)
            mean_b = sum(b for b, _ in points) / n
            mean_m = sum(m for _, m in points) / n
            slope = sum((b - mean_b) * (m - mean_m) for b, m in points) / sum((b - mean_b) ** 2 for b, _ in points)
            intercept = mean_m - slope * mean_b
            measured_max = max(0, math.floor((memory_budget_bytes - intercept) / slope + 1e-9)) if slope > 0 else None
        out.append({"label": key[0], "method": mine[0]["method"], "image_size": list(key[1]),
                    "kv_bytes_per_sequence_final": per_sequence, "max_batch_analytic": analytic_max,
                    "max_batch_measured": measured_max, "batches_measured": [b for b, _ in points]})
    for row in out:
        base = next((r for r in out if r["method"] == VANILLA and r["image_size"] == row["image_size"]), None)
        if base and base["max_batch_analytic"]:
            row["analytic_vs_vanilla"] = row["max_batch_analytic"] / base["max_batch_analytic"]
        if base and base["max_batch_measured"]:
            row["measured_vs_vanilla"] = (row["max_batch_measured"] or 0) / base["max_batch_measured"]
    return out


def machine() -> dict[str, Any]:
    import transformers

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": __import__("os").cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _fmt(stats: dict[str, float], digits: int = 1) -> str:
    return f"{stats['median']:.{digits}f} [{stats['min']:.{digits}f}–{stats['max']:.{digits}f}]"


def markdown(report: dict) -> str:
    """Table 3's layout: method, tokens, KV cache, prefill, decode, total; then the ideal columns."""
    lines = [f"# Efficiency: {report['model']} ({report['device']}, {report['dtype']})", "",
             f"{report['note']}", "",
             f"Run {report['date']} on {report['machine']['platform']} ({report['machine']['processor']}, "
             f"{report['machine'].get('gpu', 'no GPU')}), torch {report['machine']['torch']}, transformers "
             f"{report['machine']['transformers']}. {report['repeats']} repeats after {report['warmup']} warm-up, "
             f"median [min–max]; {report['new_tokens']} new tokens; prompt of {report['prompt_tokens']} text tokens.", "",
             f"Command: `{report['command']}`", ""]
    sizes = sorted({tuple(r["image_size"]) for r in report["rows"]})
    for size in sizes:
        rows = [r for r in report["rows"] if tuple(r["image_size"]) == size and r.get("batch", 1) == 1]
        if not rows:
            continue
        lines += [f"## Image {size[1]}×{size[0]} px ({rows[0]['n_visual']} visual tokens, {rows[0]['seq_len']} in all)", "",
                  "| Method | Avg. tokens | KV cache (MB) | Prefill (ms) | Decode (ms/token) | Total (ms) | Selection (ms) "
                  "| Prefill speed-up: measured / ideal | Decode: measured / ideal | KV = analytic |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            speed = (f"{r['measured_prefill_speedup']:.2f}× / {r['ideal_prefill_speedup']:.2f}× "
                     f"({r['prefill_speedup_vs_ideal']:.0%})") if "ideal_prefill_speedup" in r else "–"
            decode = f"{r['measured_decode_ratio']:.2f} / {r['ideal_decode_ratio']:.2f}" if "ideal_decode_ratio" in r else "–"
            lines.append(f"| {r['label']} | {r['visual_kv_share']:.1%} | {r['kv_bytes'] / 1e6:.2f} | {_fmt(r['prefill_ms'])} "
                         f"| {_fmt(r['decode_ms_per_token'], 2)} | {_fmt(r['total_ms'], 0)} | {_fmt(r['selection_ms'], 2)} "
                         f"| {speed} | {decode} | {'yes' if r['kv_bytes'] == r['kv_bytes_analytic'] else 'NO'} |")
        lines.append("")
    if any(r.get("batch", 1) > 1 for r in report["rows"]):
        lines += throughput_markdown(report)
    lines += ["Avg. tokens: share of the visual KV entries kept over all layers (the paper's \"Average Tokens\").",
              "Ideal prefill speed-up: FLOPs of vanilla / FLOPs of the method (vision tower + every LLM layer for "
              "the tokens it processes). Ideal decode ratio: bytes read per token (weights + KV) of the method / "
              "vanilla's. See ivcp/analytic.py.", ""]
    return "\n".join(lines)


def throughput_markdown(report: dict) -> list[str]:
    """Throughput per batch size against vanilla at the same batch, and the batches a memory budget holds."""
    lines = []
    for size in sorted({tuple(r["image_size"]) for r in report["rows"]}):
        rows = sorted((r for r in report["rows"] if tuple(r["image_size"]) == size), key=lambda r: r["batch"])
        lines += [f"## Throughput by batch size: image {size[1]}×{size[0]} px ({rows[0]['n_visual'] // rows[0]['batch']} "
                  f"visual tokens a sequence), {report['new_tokens']} new tokens a sequence", "",
                  "| Method | Batch | Tokens/s | Samples/s | Throughput vs vanilla: measured / ideal | KV cache (MB) "
                  "| KV = analytic | Peak memory (GiB) | Prefill (ms) | Decode (ms/step) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ratio = (f"{r['measured_throughput_ratio']:.2f}× / {r['ideal_throughput_ratio']:.2f}×"
                     if "ideal_throughput_ratio" in r else "–")
            peak = f"{r['peak_memory_bytes'] / 2 ** 30:.2f}" if r["peak_memory_bytes"] is not None else "–"
            lines.append(f"| {r['label']} | {r['batch']} | {_fmt(r['tokens_per_s'], 1)} | {_fmt(r['samples_per_s'], 2)} "
                         f"| {ratio} | {r['kv_bytes'] / 1e6:.2f} | {'yes' if r['kv_bytes'] == r['kv_bytes_analytic'] else 'NO'} "
                         f"| {peak} | {_fmt(r['prefill_ms'])} | {_fmt(r['decode_ms_per_token'], 2)} |")
        lines.append("")
    if report.get("capacity"):
        budget = report["memory_budget_gb"]
        lines += [f"## Sequences that fit in {budget:g} GiB (weights {report['weight_bytes'] / 2 ** 30:.2f} GiB)", "",
                  "| Method | Image | KV per sequence at its end (MB) | Largest batch, analytic (weights + KV) "
                  "| vs vanilla | Largest batch, measured peak (fit over batches) | vs vanilla |",
                  "|---|---|---|---|---|---|---|"]
        for c in report["capacity"]:
            analytic_max = "–" if c["max_batch_analytic"] is None else str(c["max_batch_analytic"])
            measured = "–" if c["max_batch_measured"] is None else f"{c['max_batch_measured']} (from {c['batches_measured']})"
            a_vs = f"{c['analytic_vs_vanilla']:.2f}×" if "analytic_vs_vanilla" in c else "–"
            m_vs = f"{c['measured_vs_vanilla']:.2f}×" if "measured_vs_vanilla" in c else "–"
            lines.append(f"| {c['label']} | {c['image_size'][1]}×{c['image_size'][0]} "
                         f"| {c['kv_bytes_per_sequence_final'] / 1e6:.2f} | {analytic_max} | {a_vs} | {measured} | {m_vs} |")
        lines += ["", "Analytic: the budget less the weights, over one sequence's KV cache at the end of its answer "
                  "(activations left out: an upper bound). Measured: a least-squares line through the peak GPU "
                  "memory of the batches run, solved for the budget (GPU only).", ""]
    lines += ["Throughput: sequences × new tokens over the whole generate() (prefill included). Ideal ratio: FLOPs of "
              "vanilla's generate over the method's (vision, prefill, every decoding step), at the same batch size.", ""]
    return lines


def plot(report: dict, path: Path) -> Path | None:
    """Prefill time and KV bytes against the visual tokens kept, one line per method; with several batch
    sizes, throughput and KV bytes against the batch size, one line per method and setting."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    kv = (lambda r: r["kv_bytes"] / 1e6)  # noqa: E731
    if len({r.get("batch", 1) for r in report["rows"]}) > 1:
        panels = [(lambda r: r["tokens_per_s"]["median"], "tokens/s (median, whole generate)", "Throughput"),
                  (kv, "KV cache after prefill (MB)", "KV cache of the batch")]
        return _draw(report, path, plt, "label", lambda r: r["batch"], "batch size", panels, log_x=True)
    panels = [(lambda r: r["prefill_ms"]["median"], "prefill (ms, median)", "Prefill"),
              (kv, "KV cache (MB)", "KV cache after prefill")]
    return _draw(report, path, plt, "method", lambda r: 100 * r["visual_kv_share"], "visual KV kept (%)", panels)


def _draw(report: dict, path: Path, plt, series: str, x, x_label: str, panels, log_x: bool = False) -> Path:
    """Two panels of lines: one line per ``series`` value (vanilla first) and image size, ``x`` against each
    panel's value."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = sorted(dict.fromkeys(r[series] for r in report["rows"]), key=lambda m: m != VANILLA)
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(names)}
    for s_index, size in enumerate(sorted({tuple(r["image_size"]) for r in report["rows"]})):
        for name in names:
            rows = sorted((r for r in report["rows"] if r[series] == name and tuple(r["image_size"]) == size), key=x)
            if not rows:
                continue
            style = dict(marker="os^v"[s_index % 4], linestyle=["-", "--", ":", "-."][s_index % 4],
                         color=colours[name], label=f"{name} {size[1]}×{size[0]}")
            for axis, (value, _, _) in zip(axes, panels):
                axis.plot([x(r) for r in rows], [value(r) for r in rows], **style)
    for axis, (_, y_label, title) in zip(axes, panels):
        axis.set(xlabel=x_label, ylabel=y_label, title=title)
        if log_x:
            axis.set_xscale("log", base=2)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{report['model']} on {report['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(report: dict, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md"}
    paths["json"].write_text(json.dumps(report, indent=1, default=str))
    paths["markdown"].write_text(markdown(report))
    png = plot(report, out / "bench.png")
    if png is not None:
        paths["plot"] = png
    return paths


def report_for(model_name: str, model, rows: list[dict], args: dict, command: str) -> dict:
    device = next(model.parameters()).device
    return {
        "model": model_name, "device": str(device), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
        "note": ("Weights: random (a bundled architecture or the tiny model); speed does not depend on the weights' "
                 "values." if not Path(model_name).exists() else "Weights: the checkpoint given."),
        "command": command, "rows": rows, **args,
    }
