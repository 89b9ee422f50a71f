#!/usr/bin/env python
"""Train the tiny Qwen2.5-VL grounder shipped in ivcp/checkpoints/tiny_grounder.

A stock ``Qwen2_5_VLForConditionalGeneration`` of about 1 M parameters learns to answer the harness's
grounding prompt on the synthetic pictures of ``ivcp data make-grounding`` (the same generator:
``ivcp.data.grounding.make_sample``) with ``{"bbox_2d": [x1, y1, x2, y2]}``. Every step draws fresh
samples from a generator seeded with (seed, step), so a run is reproducible and a resumed run sees the
same data as an uninterrupted one. Loss on the answer tokens only (and the closing <|im_end|>).

    python scripts/train_tiny_grounder.py --out outputs/tiny_grounder --steps 6000
    python scripts/train_tiny_grounder.py --out outputs/tiny_grounder --steps 6000   # resumes
    python scripts/train_tiny_grounder.py --out outputs/tiny_grounder --export ivcp/checkpoints/tiny_grounder

Writes into ``--out``: ``state.pt`` (model, optimiser, step; every ``--save-every`` steps),
``log.csv`` (step, loss, learning rate, seconds; held-out Acc@0.5 every ``--eval-every`` steps).
``--export DIR`` writes the final weights as safetensors + config.json (the shipped checkpoint).
Uses CUDA when present, else the CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ivcp.data.grounding import make_sample  # noqa: E402
from ivcp.testing import grounder_config, grounding_accuracy, tiny_processor  # noqa: E402
from ivcp.testing.grounder import prompt_text  # noqa: E402

ANSWER = '{{"bbox_2d": [{}, {}, {}, {}]}}'
LOG_FIELDS = ("step", "loss", "lr", "seconds", "heldout_acc", "heldout_parsed")
EVAL_SEED = 10_000_019  # held-out pictures during training (tests use other seeds)


def make_batch(processor, rng: random.Random, size: int) -> dict:
    """A training batch: prompt + answer + <|im_end|>, right-padded; labels only on the answer part."""
    samples = [make_sample(rng) for _ in range(size)]
    prompts = [prompt_text(processor, s["expression"]) for s in samples]
    answers = [ANSWER.format(*s["box"]) + processor.tokenizer.eos_token for s in samples]
    inputs = processor(text=[p + a for p, a in zip(prompts, answers)], images=[s["image"] for s in samples],
                       padding=True, return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    for row, answer in enumerate(answers):
        n_answer = len(processor.tokenizer(answer)["input_ids"])
        n_real = int(inputs["attention_mask"][row].sum())
        labels[row, : n_real - n_answer] = -100
    inputs["labels"] = labels
    return inputs


def loss_of(model, batch: dict) -> torch.Tensor:
    labels = batch["labels"]
    feed = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**feed).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases or embeddings."""
    decay, plain = [], []
    for name, param in model.named_parameters():
        (plain if param.dim() < 2 or "embed" in name or "norm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def learning_rate(step: int, steps: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    """Linear warm-up to ``peak``, then cosine down to ``floor`` × peak at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def build(args) -> tuple:
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(args.seed)
    config = grounder_config(**json.loads(args.config_overrides))
    model = Qwen2_5_VLForConditionalGeneration(config)
    if getattr(args, "init", ""):  # a further phase starts from an exported model
        exported = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
        model.load_state_dict(exported.state_dict())
    return model, tiny_processor("qwen2_5_vl")


def train(args) -> Path:
    with torch.enable_grad():  # VLMEvalKit turns gradients off process-wide when it is imported
        return _train(args)


def _train(args) -> Path:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = build(args)
    model.to(device).train()
    optimiser = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98))
    state_path, log_path = out / "state.pt", out / "log.csv"
    step, elapsed = 0, 0.0
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state["args"]["config_overrides"] != args.config_overrides or state["args"]["seed"] != args.seed:
            raise SystemExit(f"{state_path} was made with other settings (seed / config); use another --out")
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        step, elapsed = state["step"], state.get("seconds", 0.0)
        print(f"resumed from {state_path} at step {step}")
    if not log_path.is_file() or step == 0:
        with open(log_path, "w", newline="") as handle:
            csv.writer(handle).writerow(LOG_FIELDS)
    else:  # drop log rows written after the saved state (a run killed between two saves)
        with open(log_path, newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= step]
        with open(log_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    progress = _progress(step, args.steps)
    started = time.perf_counter()
    stop = min(args.steps, args.stop_at or args.steps)
    while step < stop:
        lr = learning_rate(step, args.steps, args.lr, args.warmup)
        for group in optimiser.param_groups:
            group["lr"] = lr
        batch = make_batch(processor, random.Random(args.seed * 1_000_003 + step), args.batch_size)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = loss_of(model, batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        step += 1
        row = {"step": step, "loss": f"{loss.item():.5f}", "lr": f"{lr:.6g}",
               "seconds": f"{elapsed + time.perf_counter() - started:.1f}", "heldout_acc": "", "heldout_parsed": ""}
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            model.eval()
            acc, parsed = grounding_accuracy(model, processor, args.eval_images, EVAL_SEED)
            model.train()
            row.update(heldout_acc=f"{acc:.2f}", heldout_parsed=f"{parsed:.3f}")
        with open(log_path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=LOG_FIELDS).writerow(row)
        progress(step, row)
        if step % args.save_every == 0 or step == stop:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(), "step": step,
                        "seconds": elapsed + time.perf_counter() - started, "args": vars(args)}, tmp)
            tmp.replace(state_path)
    return state_path


def _progress(start: int, total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # a plain line every 50 steps
        return lambda step, row: (step % 50 == 0) and print(f"step {step}/{total} loss {row['loss']}", flush=True)
    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(step, row):
        bar.update(1)
        bar.set_postfix(loss=row["loss"], **({"acc": row["heldout_acc"]} if row["heldout_acc"] else {}))
        if step == total:
            bar.close()
    return update


def export(args) -> Path:
    """Write the trained weights as safetensors + config.json into ``--export``."""
    state_path = Path(args.out) / "state.pt"
    if not state_path.is_file():
        raise SystemExit(f"nothing to export: {state_path} does not exist (train first)")
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    args.seed, args.config_overrides = state["args"]["seed"], state["args"]["config_overrides"]
    args.init = ""  # the state holds every weight
    model, _ = build(args)
    model.load_state_dict(state["model"])
    target = Path(args.export)
    model.save_pretrained(target)
    history = []
    if state["args"].get("init"):  # the phases before this one
        earlier = Path(state["args"]["init"]) / "training.json"
        if earlier.is_file():
            record = json.loads(earlier.read_text())
            history = record.get("phases", [record])  # a single-phase record is one phase
    phases = history + [{"steps": state["step"], **{k: v for k, v in state["args"].items() if k != "export"}}]
    (target / "training.json").write_text(json.dumps({"phases": phases}, indent=2) + "\n")
    print(f"exported step {state['step']} to {target}")
    return target


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run folder (state.pt, log.csv); an existing run resumes")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=250, help="0: never")
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--stop-at", type=int, default=0,
                        help="stop after this step (the schedule stays that of --steps; run again to resume)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when CUDA is present")
    parser.add_argument("--config-overrides", default="{}",
                        help='JSON overrides of the grounder config, e.g. \'{"rope_theta": 10000}\'')
    parser.add_argument("--export", default="", help="write the trained model here (safetensors + config)")
    parser.add_argument("--init", default="", help="start from this exported model (a further training phase)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.export:
        export(args)
        return 0
    train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
