#!/usr/bin/env python
"""Acc@0.5 of the shipped tiny grounder under every pruning method × keep ratio × selection layer.

    python scripts/tiny_grounder_results.py --out results/tiny-grounder            # the committed table
    python scripts/tiny_grounder_results.py --images 100 --methods vanilla,ivc_prune --out /tmp/quick

Held-out pictures come from ``ivcp.data.grounding.make_sample`` with a seed the training never used;
each sample gets the harness's exact input (chat template, the authors' grounding prompt); greedy
decoding (no repetition penalty) until <|im_end|> or 40 tokens. Scored with the authors' strict
metric (the table) and the lenient parse (beside it); standard error sqrt(p(1 − p) / n).
Writes ``results.csv`` (one row per configuration, appended as they finish: a rerun skips what is
done) and ``README.md`` (the tables and how they were made).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ivcp  # noqa: E402
from ivcp.compat import CACHE_KWARG, output_cache  # noqa: E402
from ivcp.data.grounding import make_sample  # noqa: E402
from ivcp.eval.grounding import ground_truth, iou, paper_iou, paper_prediction, parse_box  # noqa: E402
from ivcp.testing import GROUNDER_DIR, tiny_grounder  # noqa: E402

HELD_OUT_SEED = 20_000_003  # the training draws (seed * 1_000_003 + step) and 10_000_019: never this
FIELDS = ("method", "keep_ratio", "selection_layer", "params", "n", "acc", "se", "acc_lenient", "unparsed",
          "visual_kv_share", "seconds")


def configurations(methods: list[str], keep_ratios: list[float], layers: list[int]) -> list[tuple[str, dict]]:
    """(method, parameters) of the sweep. Methods with a keep ratio and one selection layer: every
    ratio × layer; PDrop: its three stages at layers 1, 2, 3 with λ = ratio at each; VScan: encoder
    keep = ratio, its LLM stage (keep 0.67) at each layer; drop_ivc: each layer; ivc_union: FastV's
    keep ratio × layer with the IVC tokens added; ``ivc_prune_no_ivc``: IVC-Prune without its IVC tokens
    (``pattern="none"``, the paper's Tab. 4 ablation)."""
    out: list[tuple[str, dict]] = []
    for method in methods:
        if method == "vanilla":
            out.append((method, {}))
        elif method == "ivc_prune_no_ivc":
            out += [("ivc_prune", {"pattern": "none", "keep_ratio": r, "selection_layer": k})
                    for r in keep_ratios for k in layers]
        elif method == "pdrop":
            out += [(method, {"stage_layers": (1, 2, 3), "stage_ratios": (r, r, r)}) for r in keep_ratios]
        elif method == "vscan":
            out += [(method, {"encoder_keep_ratio": r, "llm_keep_ratio": 0.67, "selection_layer": k})
                    for r in keep_ratios for k in layers]
        elif method == "drop_ivc":
            out += [(method, {"selection_layer": k}) for k in layers]
        elif method == "ivc_union":
            out += [(method, {"base": "fastv", "base_params": {"keep_ratio": r, "selection_layer": k}})
                    for r in keep_ratios for k in layers]
        else:
            out += [(method, {"keep_ratio": r, "selection_layer": k}) for r in keep_ratios for k in layers]
    return out


def held_out(processor, n: int, seed: int) -> list[dict]:
    """Samples with their processed inputs (made once, reused by every configuration)."""
    from ivcp.testing.grounder import prompt_text

    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        sample = make_sample(rng)
        sample["inputs"] = processor(text=[prompt_text(processor, sample["expression"])], images=[sample["image"]],
                                     return_tensors="pt")
        samples.append(sample)
    return samples


@torch.no_grad()
def greedy(model, inputs: dict, eos: int, max_new_tokens: int = 40) -> list[int]:
    """Greedy decoding with the KV cache (positions restored by the engine on a pruned cache)."""
    out = model(**inputs, use_cache=True)
    cache, tokens = output_cache(out), []
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        if token == eos:
            break
        tokens.append(token)
        out = model(input_ids=torch.tensor([[token]]), **{CACHE_KWARG: cache}, use_cache=True)
    return tokens


def evaluate(model, processor, samples: list[dict], method: str, params: dict) -> dict:
    eos = model.config.text_config.eos_token_id
    hits = lenient_hits = unparsed = 0
    shares = []
    started = time.perf_counter()
    context = ivcp.prune(model, method, **params) if method != "vanilla" else None
    session = context.__enter__() if context is not None else None
    try:
        for sample in samples:
            answer = processor.decode(greedy(model, sample["inputs"], eos))
            width, height = sample["width"], sample["height"]
            truth = sample["box"]
            row = dict(zip(("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"), truth), index=0, width=width, height=height)
            paper_truth = ground_truth(row, "pixels").paper_box  # the authors' frame (224 x 224 is its own)
            hits += paper_iou(paper_prediction(answer, "qwen2_5_vl"), paper_truth, width, height) >= 0.5
            parsed = parse_box(answer, "resized_pixels", (width, height), (width, height))
            unparsed += parsed.box is None
            lenient_hits += parsed.box is not None and iou(parsed.box, truth) >= 0.5
            shares.append(session.last.visual_kv_share if session is not None else 1.0)
    finally:
        if context is not None:
            context.__exit__(None, None, None)
    n = len(samples)
    p = hits / n
    return {"n": n, "acc": 100 * p, "se": 100 * math.sqrt(p * (1 - p) / n), "acc_lenient": 100 * lenient_hits / n,
            "unparsed": unparsed, "visual_kv_share": sum(shares) / n, "seconds": time.perf_counter() - started}


def _key(method: str, params: dict) -> str:
    return f"{method} {sorted(params.items())}"


def write_readme(out: Path, rows: list[dict], args, checkpoint_sha: str) -> None:
    layers = sorted({int(r["selection_layer"]) for r in rows if r["selection_layer"] not in ("", "None")})
    lines = ["# The tiny grounder under every pruning method", "",
             f"Acc@0.5 (the authors' strict metric) ± standard error on {rows[0]['n']} held-out pictures "
             f"(seed {args.seed}), greedy decoding; the lenient parse in brackets; Avg. tokens = visual KV kept.",
             f"Checkpoint: ivcp/checkpoints/tiny_grounder (model.safetensors sha256 {checkpoint_sha[:16]}…).",
             f"Made by: `python scripts/tiny_grounder_results.py {' '.join(sys.argv[1:])}` on "
             f"{platform.platform()} ({torch.get_num_threads()} threads, torch {torch.__version__}), "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}.", ""]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        lines += [f"## {method}", "", "| keep | " + " | ".join(f"K = {k}" for k in layers) + " | Avg. tokens |",
                  "|---|" + "---|" * (len(layers) + 1)]
        for keep in dict.fromkeys(r["keep_ratio"] for r in mine):
            cells = []
            for k in layers:
                r = next((r for r in mine if r["keep_ratio"] == keep and r["selection_layer"] == str(k)), None)
                cells.append("–" if r is None else f"{float(r['acc']):.1f} ± {float(r['se']):.1f} "
                                                   f"[{float(r['acc_lenient']):.1f}]")
            if all(c == "–" for c in cells):  # no layer sweep (vanilla, pdrop)
                r = next(r for r in mine if r["keep_ratio"] == keep)
                cells = [f"{float(r['acc']):.1f} ± {float(r['se']):.1f} [{float(r['acc_lenient']):.1f}]"] + \
                    [""] * (len(layers) - 1)
            share = next(r for r in mine if r["keep_ratio"] == keep)["visual_kv_share"]
            lines.append(f"| {keep or '–'} | " + " | ".join(cells) + f" | {100 * float(share):.0f}% |")
        lines.append("")
    reading = out / "READING.md"
    if reading.is_file():
        lines += [reading.read_text()]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/tiny-grounder")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--methods", default="vanilla," + ",".join(ivcp.available_methods()) + ",ivc_prune_no_ivc")
    parser.add_argument("--keep-ratios", default="0.25,0.5,0.75")
    parser.add_argument("--layers", default="1,2,3", help="selection layers K (0-based first pruned layer)")
    parser.add_argument("--checkpoint", default=str(GROUNDER_DIR))
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in ("vanilla", "ivc_prune_no_ivc") and m not in ivcp.available_methods()]
    if unknown:
        print(f"tiny_grounder_results: unknown method(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    configs = configurations(methods, [float(r) for r in args.keep_ratios.split(",")],
                             [int(k) for k in args.layers.split(",")])
    model, processor = tiny_grounder(args.checkpoint)
    checkpoint_sha = hashlib.sha256((Path(args.checkpoint) / "model.safetensors").read_bytes()).hexdigest()
    for method, params in configs:  # bad parameters fail now
        if method != "vanilla":
            ivcp.resolve_method(model, method, **params)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "results.csv"
    done = {}
    if table.is_file():
        with open(table, newline="") as handle:
            done = {r["params_key"]: r for r in csv.DictReader(handle)
                    if int(r["n"]) == args.images and r.get("checkpoint") == checkpoint_sha[:16]}
    samples = held_out(processor, args.images, args.seed)
    fields = FIELDS + ("params_key", "checkpoint")
    rows = []
    for i, (method, params) in enumerate(configs):
        key = _key(method, params)
        if key in done:
            rows.append(done[key])
            continue
        result = evaluate(model, processor, samples, method, params)
        keep = params.get("keep_ratio", params.get("encoder_keep_ratio", (params.get("stage_ratios") or [None])[0]
                                                   if "stage_ratios" in params else
                                                   params.get("base_params", {}).get("keep_ratio", "")))
        layer = params.get("selection_layer", params.get("base_params", {}).get("selection_layer", ""))
        label = "ivc_prune_no_ivc" if params.get("pattern") == "none" else method
        row = {"method": label, "keep_ratio": "" if keep is None else keep, "selection_layer": layer,
               "params": str(params), **result, "params_key": key, "checkpoint": checkpoint_sha[:16]}
        row = {k: str(v) for k, v in row.items()}
        new_file = not table.is_file()
        with open(table, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        rows.append(row)
        print(f"[{i + 1}/{len(configs)}] {method} {params}: {result['acc']:.1f} ± {result['se']:.1f} "
              f"(lenient {result['acc_lenient']:.1f}, {result['seconds']:.0f} s)", flush=True)
    write_readme(out, rows, args, checkpoint_sha)
    print(f"wrote {table} and {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
