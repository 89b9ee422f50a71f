"""Parity of ivcp's vLLM plugin with ivcp's Hugging Face path on the tiny grounder.

Serves the same generated grounding pictures (several sizes; every fifth prompt with a second picture)
through vLLM with the plugin (all prompts submitted at once: concurrent requests) and through
``ivcp.prune`` on the HF model, greedy. Prints the share of identical answers, the share of prompts whose
KV length in vLLM equals the HF cache's (``session.last.kv_lengths``, every layer), the share whose kept
tokens are the same set (informative: near-ties between background tokens of equal content may break
differently under vLLM's kernels, see docs/vllm.md), and Acc@0.5 of both paths; exits 1 below 100 %
identical answers or equal KV lengths.

    python scripts/vllm_parity.py --method ivc_prune --n 50          # in the vLLM environment (docs/vllm.md)
    python scripts/vllm_parity.py --method random --params '{"keep_ratio": 0.3}' --n 20
    python scripts/vllm_parity.py --method none --n 20               # the plugin's class unpruned vs plain vLLM
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

SIZES = [(224, 224), (280, 224), (224, 168), (336, 280), (168, 112)]


def prompts(n: int, seed: int) -> list[dict]:
    from ivcp.data.grounding import make_sample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        sample = make_sample(rng, canvas=SIZES[i % len(SIZES)])
        images = [sample["image"]]
        if i % 5 == 4:  # a second picture before the first: the expression is about the last one
            images.insert(0, make_sample(rng, canvas=SIZES[(i + 2) % len(SIZES)])["image"])
        out.append({**sample, "images": images})
    return out


def prompt_text(processor, expression: str, n_images: int) -> str:
    from ivcp.eval.grounding import grounding_prompt

    content = [{"type": "image"}] * n_images + [{"type": "text", "text": grounding_prompt(expression)}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def hf_answers(folder: Path, samples: list[dict], method: str | None, params: dict, max_tokens: int,
               batch_size: int = 10) -> list[dict]:
    """ivcp's HF path, in left-padded batches (each row is pruned as it would be alone: ivcp's batch
    contract): answer, every layer's KV length and the kept tokens (indices without the row's padding)."""
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    import ivcp

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    layers = model.config.text_config.num_hidden_layers
    args = dict(max_new_tokens=max_tokens, do_sample=False, repetition_penalty=1.0,
                pad_token_id=model.config.text_config.pad_token_id, eos_token_id=model.config.text_config.eos_token_id)
    out = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start: start + batch_size]
        texts = [prompt_text(processor, s["expression"], len(s["images"])) for s in batch]
        inputs = processor(text=texts, images=[image for s in batch for image in s["images"]], padding=True,
                           return_tensors="pt")
        with torch.no_grad():
            if method is None:
                generated = model.generate(**inputs, **args)
                rows = [None] * len(batch)
            else:
                with ivcp.prune(model, method, **params) as session:
                    generated = model.generate(**inputs, **args)
                rows = list(session.last)
        texts = processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for b, (text, row) in enumerate(zip(texts, rows)):
            real = inputs["attention_mask"][b].bool()
            ids = inputs["input_ids"][b][real].tolist()
            if row is None:
                kv, kept = [len(ids)] * layers, None
            else:
                kv, kept = list(row.kv_lengths), (row.kept - row.padding).tolist()
            out.append({"answer": text, "kv_lengths": kv, "kept": kept, "prompt_ids": ids})
    return out


def vllm_answers(folder: Path, samples: list[dict], method: str | None, params: dict, max_tokens: int,
                 plugin: bool = True) -> list[dict]:
    """The same prompts through vLLM, submitted together (the engine batches them)."""
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from ivcp.vllm import engine_args

    processor = AutoProcessor.from_pretrained(folder)
    record = Path(tempfile.mkdtemp()) / "kept.jsonl"
    os.environ["IVCP_VLLM_RECORD"] = str(record)
    kwargs = engine_args(method, **params) if plugin else {"enable_prefix_caching": False}
    llm = LLM(model=str(folder), dtype="float32", max_model_len=4096, enforce_eager=True, gpu_memory_utilization=0.05,
              limit_mm_per_prompt={"image": 2}, max_num_seqs=16, seed=0, **kwargs)
    requests = [{"prompt": prompt_text(processor, s["expression"], len(s["images"])),
                 "multi_modal_data": {"image": s["images"] if len(s["images"]) > 1 else s["images"][0]}}
                for s in samples]
    outputs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=max_tokens, repetition_penalty=1.0))
    kept = {}
    if record.is_file():
        for line in record.read_text().splitlines():
            entry = json.loads(line)
            kept.setdefault(tuple(entry["prompt_ids"]), entry["kept"])
    return [{"answer": o.outputs[0].text, "kv_length": len(o.prompt_token_ids)} for o in outputs], kept


def accuracy(samples: list[dict], answers: list[str]) -> float:
    from ivcp.eval.grounding import iou, parse_box

    hits = total = 0
    for sample, answer in zip(samples, answers):
        if len(sample["images"]) != 1:
            continue
        size = (sample["width"], sample["height"])
        box = parse_box(answer, "resized_pixels", size, size)
        total += 1
        hits += box.box is not None and iou(box.box, sample["box"]) >= 0.5
    return 100.0 * hits / total if total else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="ivc_prune", help="a method the plugin serves, or 'none' (unpruned: the "
                        "plugin's class against plain vLLM)")
    parser.add_argument("--params", default="{}", help="the method's parameters, JSON")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--model-dir", type=Path, default=None, help="a servable model folder; a missing or empty one gets "
                        "the tiny grounder written with a real Qwen2_5_VLProcessor (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="write the per-prompt comparison here")
    args = parser.parse_args(argv)
    params = json.loads(args.params)
    method = None if args.method == "none" else args.method

    from ivcp.vllm.folder import serving_folder

    folder = args.model_dir if args.model_dir is not None and (args.model_dir / "config.json").is_file() else \
        serving_folder(args.model_dir or Path(tempfile.mkdtemp()) / "tiny_grounder")
    samples = prompts(args.n, args.seed)
    if method is None:  # the plugin's class with pruning off against plain vLLM
        reference, _ = vllm_answers(folder, samples, None, {}, args.max_tokens, plugin=False)
        served, kept = vllm_answers(folder, samples, None, {}, args.max_tokens, plugin=True)
        for r in reference:
            r["kv_lengths"], r["kept"], r["prompt_ids"] = [r["kv_length"]], None, None
    else:
        reference = hf_answers(folder, samples, method, params, args.max_tokens)
        served, kept = vllm_answers(folder, samples, method, params, args.max_tokens)
    same = [r["answer"] == s["answer"] for r, s in zip(reference, served)]
    kv_same = [set(r["kv_lengths"]) == {s["kv_length"]} for r, s in zip(reference, served)]
    kept_same = [r["kept"] is None or kept.get(tuple(r["prompt_ids"])) == r["kept"] for r in reference]
    name = "plain vLLM" if method is None else "ivcp HF"
    print(f"{args.method} {params}: {len(samples)} prompts ({sum(len(s['images']) > 1 for s in samples)} with two "
          f"pictures; sizes {', '.join(f'{w}x{h}' for w, h in SIZES)})")
    print(f"identical answers: {100.0 * sum(same) / len(same):.1f} %  ({sum(same)}/{len(same)})")
    print(f"KV length equal:   {100.0 * sum(kv_same) / len(kv_same):.1f} %")
    if method is not None:
        print(f"kept tokens equal: {100.0 * sum(kept_same) / len(kept_same):.1f} %")
    print(f"Acc@0.5: {name} {accuracy(samples, [r['answer'] for r in reference]):.1f} %, "
          f"vLLM + ivcp {accuracy(samples, [s['answer'] for s in served]):.1f} %")
    for i, (r, s) in enumerate(zip(reference, served)):
        if r["answer"] != s["answer"]:
            print(f"  prompt {i}: {name} {r['answer']!r} != vLLM {s['answer']!r}")
    if args.json:
        args.json.write_text(json.dumps([{"reference": r["answer"], "vllm": s["answer"], "kv_lengths": r["kv_lengths"],
                                          "vllm_kv_length": s["kv_length"]} for r, s in zip(reference, served)], indent=1))
    return 0 if all(same) and all(kv_same) else 1


if __name__ == "__main__":
    sys.exit(main())
