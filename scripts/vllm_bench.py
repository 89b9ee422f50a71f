"""vLLM throughput at a fixed KV budget: vanilla against pruned, on the same prompts.

Every configuration serves the same generated grounding prompts (all submitted at once) with the KV
cache fixed to ``--blocks`` blocks (``num_gpu_blocks_override``; on GPU this replaces a
``gpu_memory_utilization`` budget), so memory, not ``max_num_seqs``, limits how many sequences run
together. Reports requests/s, generated tokens/s, mean time to first token, KV blocks per request and
how many requests the budget holds at once, with the analytic ratio (prompt tokens pruned / vanilla)
beside. Each configuration runs in its own process (vLLM starts workers; a fresh engine per setting).

    .venv-vllm/bin/python scripts/vllm_bench.py --methods vanilla,ivc_prune --n 48 --blocks 40 \\
        --out results/bench/cpu-vllm-tiny-grounder
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BLOCK = 32  # the CPU attention backend takes multiples of 32


def serve(folder: str, method: str, params: dict, n: int, blocks: int, max_tokens: int, seed: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from vllm import LLM, SamplingParams
    from transformers import AutoProcessor

    from ivcp.vllm import engine_args
    from vllm_parity import prompt_text, prompts

    samples = prompts(n, seed)
    processor = AutoProcessor.from_pretrained(folder)
    kwargs = {"enable_prefix_caching": False, "enable_chunked_prefill": False} if method == "vanilla" \
        else engine_args(method, **params)
    llm = LLM(model=folder, dtype="float32", max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.05, block_size=BLOCK,
              num_gpu_blocks_override=blocks, max_num_seqs=256, max_num_batched_tokens=4096,
              limit_mm_per_prompt={"image": 2}, disable_log_stats=False, seed=0, **kwargs)
    requests = [{"prompt": prompt_text(processor, s["expression"], len(s["images"])),
                 "multi_modal_data": {"image": s["images"] if len(s["images"]) > 1 else s["images"][0]}}
                for s in samples]
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(requests[:2], sampling)  # warm-up
    started = time.perf_counter()
    outputs = llm.generate(requests, sampling)
    seconds = time.perf_counter() - started
    prompt_tokens = [len(o.prompt_token_ids) for o in outputs]
    generated = [len(o.outputs[0].token_ids) for o in outputs]
    ttft = [o.metrics.first_token_latency for o in outputs if getattr(o, "metrics", None) is not None]
    per_request = [math.ceil((p + g) / BLOCK) for p, g in zip(prompt_tokens, generated)]
    return {"method": method, "params": params, "requests": n, "seconds": seconds, "requests_per_s": n / seconds,
            "tokens_per_s": sum(generated) / seconds, "mean_ttft_s": sum(ttft) / len(ttft) if ttft else None,
            "mean_prompt_tokens": sum(prompt_tokens) / n, "kv_blocks_per_request": sum(per_request) / n,
            "kv_blocks": blocks, "requests_that_fit": blocks // max(per_request)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="vanilla,ivc_prune")
    parser.add_argument("--params", default="{}", help="JSON parameters of the pruning methods")
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--blocks", type=int, default=40, help="KV blocks of 32 tokens (the fixed KV budget)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    params = json.loads(args.params)
    if args.one:  # a child: one configuration, JSON on its IVCP_BENCH line
        print("IVCP_BENCH " + json.dumps(serve(args.model_dir, args.one, params, args.n, args.blocks, args.max_tokens,
                                               args.seed)), flush=True)
        return 0
    from ivcp.vllm.folder import serving_folder

    folder = args.model_dir or str(serving_folder(Path(tempfile.mkdtemp()) / "tiny_grounder"))
    rows = []
    for method in args.methods.split(","):
        done = subprocess.run([sys.executable, __file__, "--one", method, "--params", args.params, "--n", str(args.n),
                               "--blocks", str(args.blocks), "--max-tokens", str(args.max_tokens), "--seed",
                               str(args.seed), "--model-dir", folder], capture_output=True, text=True)
        if done.returncode:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            print(f"vllm_bench: {method} failed", file=sys.stderr)
            return 1
        rows.append(json.loads([line for line in done.stdout.splitlines() if line.startswith("IVCP_BENCH ")][-1][11:]))
    base = rows[0]
    print(f"{args.n} prompts, KV budget {args.blocks} blocks x {BLOCK} tokens, {args.max_tokens} generated tokens each")
    print(f"{'method':<12}{'req/s':>8}{'tok/s':>9}{'TTFT s':>8}{'prompt':>8}{'blocks/req':>11}{'fit':>5}"
          f"{'x req/s':>9}{'analytic':>9}")
    for row in rows:
        row["speedup"] = row["requests_per_s"] / base["requests_per_s"]
        row["analytic_prompt_ratio"] = row["mean_prompt_tokens"] / base["mean_prompt_tokens"]
        ttft = f"{row['mean_ttft_s']:.3f}" if row["mean_ttft_s"] is not None else "-"
        print(f"{row['method']:<12}{row['requests_per_s']:>8.2f}{row['tokens_per_s']:>9.1f}{ttft:>8}"
              f"{row['mean_prompt_tokens']:>8.1f}{row['kv_blocks_per_request']:>11.2f}{row['requests_that_fit']:>5}"
              f"{row['speedup']:>9.2f}{row['analytic_prompt_ratio']:>9.2f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
