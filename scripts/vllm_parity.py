"""Parity of ivcp's vLLM plugin with ivcp's Hugging Face path (tiny grounder, tiny Qwen2-VL / Qwen3-VL).

Serves the same generated grounding pictures (several sizes; every fifth prompt with a second picture)
through vLLM with the plugin and through ``ivcp.prune`` on the HF model, greedy. With several methods
(``--methods``) one engine serves them all: every prompt once per method, all requests submitted
together, so one batch mixes methods; the first method is the model's (``engine_args``), the others
come per request (``mm_processor_kwargs``). Prints, per method, the share of identical answers, the
share of prompts whose KV length in vLLM equals the HF cache's (``session.last.kv_lengths``, every
layer), the share whose kept tokens are the same set, and Acc@0.5 of both paths; exits 1 below 100 %
identical answers, equal KV lengths or (pruned methods) equal kept sets. ``none`` (unpruned) is compared with
plain vLLM (vLLM's own model class, a second engine).

    python scripts/vllm_parity.py --method ivc_prune --n 50          # in the vLLM environment (docs/vllm.md)
    python scripts/vllm_parity.py --method random --params '{"keep_ratio": 0.3}' --n 20
    python scripts/vllm_parity.py --family qwen3_vl --methods '[["ivc_prune", {}], ["random", {"keep_ratio": 0.3}]]'
    python scripts/vllm_parity.py --method none --n 20               # the plugin's class unpruned vs plain vLLM
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from ivcp.vllm.prompts import SIZES, allowed_tokens, prompt_text, prompts  # noqa: F401 (used by other scripts)

def hf_answers(folder: Path, samples: list[dict], method: str | None, params: dict, max_tokens: int,
               batch_size: int = 10, dtype: str = "float32") -> list[dict]:
    """ivcp's HF path, in left-padded batches (each row is pruned as it would be alone: ivcp's batch
    contract): answer, every layer's KV length and the kept tokens (indices without the row's padding)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import ivcp

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    model.eval()
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    text = model.config.get_text_config()
    args = dict(max_new_tokens=max_tokens, do_sample=False, repetition_penalty=1.0,
                pad_token_id=text.pad_token_id, eos_token_id=text.eos_token_id)
    out = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start: start + batch_size]
        texts = [prompt_text(processor, s["expression"], len(s["images"])) for s in batch]
        inputs = processor(text=texts, images=[image for s in batch for image in s["images"]], padding=True,
                           return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.no_grad():
            if method is None:
                generated = model.generate(**inputs, **args)
                rows = [None] * len(batch)
            else:
                with ivcp.prune(model, method, **params) as session:
                    generated = model.generate(**inputs, **args)
                rows = list(session.last)
        answers = processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for b, (answer, row) in enumerate(zip(answers, rows)):
            real = inputs["attention_mask"][b].bool()
            ids = inputs["input_ids"][b][real].tolist()
            if row is None:
                kv, kept = [len(ids)] * text.num_hidden_layers, None
            else:
                kv, kept = list(row.kv_lengths), (row.kept - row.padding).tolist()
            out.append({"answer": answer, "kv_lengths": kv, "kept": kept, "prompt_ids": ids})
    return out


def make_llm(folder: Path, method: str | None, params: dict, plugin: bool = True, dtype: str = "float32", **options):
    """One vLLM engine on ``folder``: the plugin's class with ``method`` as the model's default, or (plugin
    False) vLLM's own class; float32 unless ``dtype`` says otherwise (vLLM would downcast a float32
    checkpoint to bf16 on CPU)."""
    from vllm import LLM

    from ivcp.vllm import engine_args

    config = json.loads((folder / "config.json").read_text())
    kwargs = engine_args(method, architecture=config["architectures"][0], **params) if plugin else \
        {"enable_prefix_caching": False}
    settings = dict(dtype=dtype, max_model_len=4096, enforce_eager=True, kv_cache_memory_bytes=256 * 2 ** 20,
                    limit_mm_per_prompt={"image": 2}, max_num_seqs=32, seed=0)
    settings.update(options)
    return LLM(model=str(folder), **settings, **kwargs)


def vllm_answers(llm, folder: Path, samples: list[dict], specs: list[tuple[str | None, dict] | None],
                 max_tokens: int, record: Path | None = None):
    """The prompts through one engine, submitted together (the engine batches them): prompt i with the
    method ``specs[i]`` sent per request (None: the model's own). Returns the answers and the plugin's
    kept-token records: (method repr, prompt ids) → the kept tokens of every prefill with that key (prompts
    with equal text and picture sizes have equal ids: their pictures differ only in pixels)."""
    from transformers import AutoProcessor
    from vllm import SamplingParams

    processor = AutoProcessor.from_pretrained(folder)
    if record is not None and record.is_file():
        record.unlink()
    requests = []
    for sample, spec in zip(samples, specs):
        request = {"prompt": prompt_text(processor, sample["expression"], len(sample["images"])),
                   "multi_modal_data": {"image": sample["images"] if len(sample["images"]) > 1 else sample["images"][0]}}
        if spec is not None:
            request["mm_processor_kwargs"] = {"ivcp_method": spec[0] or "none", "ivcp_params": spec[1]}
        requests.append(request)
    outputs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=max_tokens, repetition_penalty=1.0,
                                                    allowed_token_ids=allowed_tokens(folder)))
    kept = {}
    if record is not None and record.is_file():
        for line in record.read_text().splitlines():
            entry = json.loads(line)
            kept.setdefault((entry["method"], tuple(entry["prompt_ids"])), []).append(entry["kept"])
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


def method_repr(folder: Path, name: str, params: dict) -> str:
    from transformers import AutoConfig

    from ivcp.vllm.method import resolve

    config = AutoConfig.from_pretrained(folder)
    text = config.get_text_config()
    return repr(resolve(config.model_type, text.num_hidden_layers, text.hidden_size, name, params))


def matched(reference: list[dict], runs: dict, method: str) -> list[bool]:
    """Whether each HF row's kept set equals a distinct vLLM prefill's of the same (method, prompt ids): a
    one-to-one matching, since prompts of equal text and picture sizes share their ids."""
    out = []
    for r in reference:
        candidates = runs.get((method, tuple(r["prompt_ids"])), [])
        if r["kept"] in candidates:
            candidates.remove(r["kept"])
            out.append(True)
        else:
            out.append(False)
    return out


def compare(label: str, name: str, samples, reference, served, kept=None, method=None) -> bool:
    """Print one method's parity lines; True when every answer, KV length and kept set is equal."""
    same = [r["answer"] == s["answer"] for r, s in zip(reference, served)]
    kv_same = [set(r["kv_lengths"]) == {s["kv_length"]} for r, s in zip(reference, served)]
    print(f"[{label}] identical answers: {100.0 * sum(same) / len(same):.1f} %  ({sum(same)}/{len(same)})")
    print(f"[{label}] KV length equal:   {100.0 * sum(kv_same) / len(kv_same):.1f} %")
    kept_same = []
    if kept is not None:
        kept_same = matched(reference, {key: list(runs) for key, runs in kept.items() if key[0] == method}, method)
        print(f"[{label}] kept tokens equal: {100.0 * sum(kept_same) / len(kept_same):.1f} %")
        for i, r in enumerate(reference):
            if not kept_same[i]:
                runs = kept.get((method, tuple(r["prompt_ids"]))) or [[]]
                fewest = min(len(set(run) - set(r["kept"])) for run in runs)
                print(f"  prompt {i} ({len(samples[i]['images'])} picture(s)): kept set differs from every vLLM "
                      f"prefill of the same prompt ids (by {fewest} token(s) each way at least)")
    print(f"[{label}] Acc@0.5: {name} {accuracy(samples, [r['answer'] for r in reference]):.1f} %, "
          f"vLLM + ivcp {accuracy(samples, [s['answer'] for s in served]):.1f} %")
    for i, (r, s) in enumerate(zip(reference, served)):
        if r["answer"] != s["answer"] or set(r["kv_lengths"]) != {s["kv_length"]}:
            print(f"  prompt {i}: {name} {r['answer']!r} (KV {sorted(set(r['kv_lengths']))}) != "
                  f"vLLM {s['answer']!r} (KV {s['kv_length']})")
    return all(same) and all(kv_same) and (kept is None or all(kept_same))


def request_errors(llm, folder: Path, sample: dict) -> bool:
    """Bad methods and parameters sent per request fail at ``generate`` with ivcp's own one-line errors,
    and the engine serves the next request."""
    from transformers import AutoProcessor
    from vllm import SamplingParams

    processor = AutoProcessor.from_pretrained(folder)
    request = {"prompt": prompt_text(processor, sample["expression"], 1), "multi_modal_data": {"image": sample["images"][-1]}}
    cases = [({"ivcp_method": "no_such_method"}, "unknown method"),
             ({"ivcp_method": "ivc_prune", "ivcp_params": {"keep_ratio": 2.0}}, "keep_ratio must be in"),
             ({"ivcp_method": "ivc_prune", "ivcp_params": {"no_such_param": 1}}, "no_such_param"),
             ({"ivcp_method": "fastv"}, "not 'fastv'"),
             ({"ivcp_params": {"keep_ratio": 0.3}}, "ivcp_params without ivcp_method")]
    ok = True
    for kwargs, expected in cases:
        try:
            llm.generate([{**request, "mm_processor_kwargs": kwargs}], SamplingParams(max_tokens=2), use_tqdm=False)
        except Exception as error:  # noqa: BLE001 - the message is what is checked
            text = str(error)
            good = expected in text and "\n" not in text.strip()
            print(f"request error {kwargs}: {'ok' if good else 'WRONG'}: {text.strip()[:300]}")
            ok &= good
        else:
            print(f"request error {kwargs}: WRONG: no error raised")
            ok = False
    served = llm.generate([request], SamplingParams(max_tokens=2), use_tqdm=False)
    ok &= len(served[0].outputs[0].token_ids) > 0
    print("ok request_errors" if ok else "request errors: DIFFERENCES (see above)")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="grounder", choices=["grounder", "qwen2_vl", "qwen3_vl"],
                        help="grounder: the tiny grounder (Qwen2.5-VL, trained); qwen2_vl / qwen3_vl: tiny random models")
    parser.add_argument("--method", default="ivc_prune", help="a method the plugin serves, or 'none' (unpruned: the "
                        "plugin's class against plain vLLM)")
    parser.add_argument("--params", default="{}", help="the method's parameters, JSON")
    parser.add_argument("--methods", default=None, help='several methods served by one engine, JSON: '
                        '[["ivc_prune", {}, 50], ["random", {"keep_ratio": 0.3}], ...]: name, parameters and optionally '
                        'the number of prompts (default --n); overrides --method')
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--model-dir", type=Path, default=None, help="a servable model folder; a missing or empty one gets "
                        "the tiny model of --family written with a real processor (default: a temporary folder)")
    parser.add_argument("--request-errors", action="store_true", help="also send bad methods / parameters per request "
                        "and check ivcp's errors (multi-method runs)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both paths in this dtype "
                        "(default float32; bfloat16 as real checkpoints are served: kernels round differently there)")
    parser.add_argument("--json", type=Path, default=None, help="write the per-prompt comparison here")
    args = parser.parse_args(argv)
    entries = json.loads(args.methods) if args.methods else [[args.method, json.loads(args.params)]]
    counts = [int(e[2]) if len(e) > 2 else args.n for e in entries]
    specs = [(None if e[0] in ("none", "vanilla") else e[0], e[1]) for e in entries]

    from ivcp.vllm.folder import serving_folder

    family = None if args.family == "grounder" else args.family
    folder = args.model_dir if args.model_dir is not None and (args.model_dir / "config.json").is_file() else \
        serving_folder(args.model_dir or Path(tempfile.mkdtemp()) / args.family, family=family)
    samples = prompts(max(counts), args.seed)
    print(f"{args.family}: {', '.join(map(str, counts))} prompts per method (every fifth with two pictures; sizes "
          f"{', '.join(f'{w}x{h}' for w, h in SIZES)})")
    record = Path(tempfile.mkdtemp()) / "kept.jsonl"
    os.environ["IVCP_VLLM_RECORD"] = str(record)
    ok, dump = True, []
    if specs == [(None, {})]:  # the plugin's class with pruning off against plain vLLM
        reference, _ = vllm_answers(make_llm(folder, None, {}, plugin=False, dtype=args.dtype), folder, samples, [None] * len(samples),
                                    args.max_tokens)
        served, _ = vllm_answers(make_llm(folder, None, {}, dtype=args.dtype), folder, samples, [None] * len(samples), args.max_tokens)
        for r in reference:
            r["kv_lengths"], r["prompt_ids"] = [r["kv_length"]], None
        ok = compare("none", "plain vLLM", samples, reference, served)
    else:
        default = specs[0]
        llm = make_llm(folder, default[0], default[1], dtype=args.dtype)
        all_samples, all_specs, slices = [], [], []
        for k, (spec, n) in enumerate(zip(specs, counts)):  # the first method is the model's: sent without kwargs
            slices.append(slice(len(all_samples), len(all_samples) + n))
            all_samples += samples[:n]
            all_specs += [None if k == 0 else spec] * n
        served_all, kept = vllm_answers(llm, folder, all_samples, all_specs, args.max_tokens, record)
        for (name, params), n, part in zip(specs, counts, slices):
            label = "none" if name is None else f"{name} {json.dumps(params)}"
            reference = hf_answers(folder, samples[:n], name, params, args.max_tokens, dtype=args.dtype)
            served = served_all[part]
            method = None if name is None else method_repr(folder, name, params)
            ok &= compare(label, "ivcp HF", samples[:n], reference, served, None if name is None else kept, method)
            dump += [{"method": label, "reference": r["answer"], "vllm": s["answer"], "kv_lengths": r["kv_lengths"],
                      "vllm_kv_length": s["kv_length"]} for r, s in zip(reference, served)]
        if args.request_errors:
            ok &= request_errors(llm, folder, samples[0])
        del llm
    if args.json:
        args.json.write_text(json.dumps(dump, indent=1))
    print("parity: " + ("every answer, KV length and kept set equal" if ok else "DIFFERENCES (see above)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
