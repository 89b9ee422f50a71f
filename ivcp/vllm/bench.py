"""vLLM throughput at a fixed KV budget: vanilla vLLM against pruned vLLM on the same prompts
(``ivcp bench --engine vllm``, ``python -m ivcp.vllm.bench``, ``scripts/vllm_bench.py``).

Every configuration serves the same generated grounding prompts (all submitted at once) with the KV
cache fixed to ``blocks`` blocks of 32 tokens (``num_gpu_blocks_override``: the same budget on CPU and
GPU, independent of ``VLLM_CPU_KVCACHE_SPACE`` / ``gpu_memory_utilization``), so memory, not
``max_num_seqs``, limits how many sequences run together. Reports requests/s, generated tokens/s, mean
time to first token, KV blocks per request (what the scheduler allocates: ⌈(prompt + generated) / 32⌉)
and how many requests the budget holds at once, with the analytic ratio (the pruned prompt's tokens /
vanilla's = its KV share) beside. Each configuration runs in a fresh process (a fresh engine, vLLM's
usual multi-process layout), warms up, then serves the prompts ``repeats`` times: the rates are the
median round's, with the slowest and fastest rounds beside. Imports vLLM only in the child processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BLOCK = 32  # the CPU attention backend takes multiples of 32
MAX_MODEL_LEN = 512  # the longest sequence the bench's engines admit (vLLM needs the budget to hold one)


def _serve(folder: str, method: str, params: dict, n: int, blocks: int, max_tokens: int, seed: int,
           repeats: int = 3) -> dict:
    """One configuration in this process (the child)."""
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from ivcp.vllm import engine_args

    from .prompts import allowed_tokens, prompt_text, prompts

    samples = prompts(n, seed)
    processor = AutoProcessor.from_pretrained(folder)
    architecture = json.loads((Path(folder) / "config.json").read_text())["architectures"][0]
    kwargs = {"enable_prefix_caching": False, "enable_chunked_prefill": False} if method == "vanilla" \
        else engine_args(method, architecture=architecture, **params)
    llm = LLM(model=folder, dtype="float32", max_model_len=MAX_MODEL_LEN, enforce_eager=True, block_size=BLOCK,
              kv_cache_memory_bytes=256 * 2 ** 20, num_gpu_blocks_override=blocks, max_num_seqs=256,
              max_num_batched_tokens=4096, limit_mm_per_prompt={"image": 2}, disable_log_stats=False, seed=0, **kwargs)
    requests = [{"prompt": prompt_text(processor, s["expression"], len(s["images"])),
                 "multi_modal_data": {"image": s["images"] if len(s["images"]) > 1 else s["images"][0]}}
                for s in samples]
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                              allowed_token_ids=allowed_tokens(Path(folder)))
    llm.generate(requests[:2], sampling, use_tqdm=False)  # warm-up
    rounds = []
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = llm.generate(requests, sampling, use_tqdm=False)
        seconds = time.perf_counter() - started
        ttft = [o.metrics.first_token_latency for o in outputs if getattr(o, "metrics", None) is not None]
        rounds.append((seconds, sum(ttft) / len(ttft) if ttft else None))
    seconds, mean_ttft = sorted(rounds, key=lambda r: r[0])[len(rounds) // 2]  # the median round
    prompt_tokens = [len(o.prompt_token_ids) for o in outputs]
    generated = [len(o.outputs[0].token_ids) for o in outputs]
    per_request = [math.ceil((p + g) / BLOCK) for p, g in zip(prompt_tokens, generated)]
    return {"method": method, "params": params, "requests": n, "repeats": repeats,
            "round_seconds": [r[0] for r in rounds], "seconds": seconds, "requests_per_s": n / seconds,
            "requests_per_s_range": [n / max(r[0] for r in rounds), n / min(r[0] for r in rounds)],
            "tokens_per_s": sum(generated) / seconds, "mean_ttft_s": mean_ttft,
            "mean_prompt_tokens": sum(prompt_tokens) / n, "kv_blocks_per_request": sum(per_request) / n,
            "kv_blocks": blocks, "requests_that_fit": blocks // max(per_request)}


def vllm_python() -> str:
    """The Python that has vLLM: this one, $IVCP_VLLM_PYTHON, or the checkout's .venv-vllm."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    candidate = Path(os.environ.get("IVCP_VLLM_PYTHON", Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"))
    if not candidate.is_file():
        raise RuntimeError(f"no vLLM here and none at {candidate}: make it with `bash scripts/setup.sh` "
                           "or set IVCP_VLLM_PYTHON")
    return str(candidate)


def run(folder: str, methods: list[str], params: dict, n: int, blocks: int, max_tokens: int, seed: int,
        repeats: int = 3) -> list[dict]:
    """Every method in its own process (vanilla first: the ratios are against the first method)."""
    rows = []
    for method in methods:
        done = subprocess.run([vllm_python(), "-m", "ivcp.vllm.bench", "--one", method, "--params", json.dumps(params),
                               "--n", str(n), "--blocks", str(blocks), "--max-tokens", str(max_tokens), "--seed",
                               str(seed), "--repeats", str(repeats), "--model-dir", folder], capture_output=True,
                              text=True)
        if done.returncode:
            raise RuntimeError(f"vLLM bench of {method} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        rows.append(json.loads([line for line in done.stdout.splitlines() if line.startswith("IVCP_BENCH ")][-1][11:]))
    base = rows[0]
    for row in rows:
        row["speedup"] = row["requests_per_s"] / base["requests_per_s"]
        row["analytic_prompt_ratio"] = row["mean_prompt_tokens"] / base["mean_prompt_tokens"]
    return rows


def table(rows: list[dict], n: int, blocks: int, max_tokens: int) -> str:
    repeats = rows[0].get("repeats", 1)
    lines = [f"{n} prompts, KV budget {blocks} blocks x {BLOCK} tokens, {max_tokens} generated tokens each; "
             f"rates of the median of {repeats} rounds (req/s of the slowest-fastest round beside)",
             f"{'method':<12}{'req/s':>8}{'range':>13}{'tok/s':>9}{'TTFT s':>8}{'prompt':>8}{'blocks/req':>11}{'fit':>5}"
             f"{'x req/s':>9}{'analytic':>9}"]
    for row in rows:
        ttft = f"{row['mean_ttft_s']:.3f}" if row["mean_ttft_s"] is not None else "-"
        low, high = row.get("requests_per_s_range", [row["requests_per_s"]] * 2)
        lines.append(f"{row['method']:<12}{row['requests_per_s']:>8.2f}{f'{low:.2f}-{high:.2f}':>13}"
                     f"{row['tokens_per_s']:>9.1f}{ttft:>8}"
                     f"{row['mean_prompt_tokens']:>8.1f}{row['kv_blocks_per_request']:>11.2f}{row['requests_that_fit']:>5}"
                     f"{row['speedup']:>9.2f}{row['analytic_prompt_ratio']:>9.2f}")
    return "\n".join(lines)


def bench(model: str | None, methods: list[str], params: dict, n: int, blocks: int, max_tokens: int, seed: int,
          out: str | Path | None, command: str, repeats: int = 3) -> list[dict]:
    """Serve, print the table, write ``out``/bench.json and bench.md. ``model``: a servable folder, or
    None / ``tiny`` for the tiny grounder (written to a temporary folder)."""
    if n < 1:
        raise ValueError(f"requests must be at least 1, got {n}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if blocks * BLOCK < MAX_MODEL_LEN:
        raise ValueError(f"a KV budget of {blocks} blocks x {BLOCK} tokens cannot hold one sequence of the bench's "
                         f"longest ({MAX_MODEL_LEN} tokens): give at least {-(-MAX_MODEL_LEN // BLOCK)} blocks")
    if model in (None, "tiny"):
        from .folder import serving_folder

        model = str(serving_folder(Path(tempfile.mkdtemp()) / "tiny_grounder"))
    elif not (Path(model) / "config.json").is_file():
        raise ValueError(f"ivcp bench --engine vllm: {model} is not a model folder (no config.json); give a local "
                         "checkpoint folder with its processor, or 'tiny'")
    rows = run(model, methods, params, n, blocks, max_tokens, seed, repeats)
    text = table(rows, n, blocks, max_tokens)
    print(text)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
        (out / "bench.md").write_text(f"# vLLM at a fixed KV budget\n\nMade by `{command}`.\n\n```\n{text}\n```\n")
        print(f"wrote {out / 'bench.json'}\nwrote {out / 'bench.md'}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="vanilla,ivc_prune", help="comma-separated; the first is the baseline")
    parser.add_argument("--params", default="{}", help="JSON parameters of the pruning methods")
    parser.add_argument("--n", type=int, default=48, help="prompts (requests, all submitted at once)")
    parser.add_argument("--blocks", type=int, default=40, help="KV blocks of 32 tokens (the fixed KV budget)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per configuration (the median is reported)")
    parser.add_argument("--model-dir", default=None, help="a servable model folder (default: the tiny grounder)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    params = json.loads(args.params)
    if args.one:  # a child: one configuration, JSON on its IVCP_BENCH line
        print("IVCP_BENCH " + json.dumps(_serve(args.model_dir, args.one, params, args.n, args.blocks, args.max_tokens,
                                               args.seed, args.repeats)), flush=True)
        return 0
    try:
        bench(args.model_dir, args.methods.split(","), params, args.n, args.blocks, args.max_tokens, args.seed, args.out,
              "python -m ivcp.vllm.bench " + " ".join(sys.argv[1:] if argv is None else argv), args.repeats)
    except (RuntimeError, ValueError) as error:
        print(f"vllm bench: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
