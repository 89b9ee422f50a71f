"""Checks run inside the vLLM environment by tests/test_vllm.py (not a pytest module: the vLLM environment
has no pytest).

``python tests/vllm_checks.py``: no engine is started; each check prints "ok <name>" or raises; bad
names / parameters and refused engine settings must fail with ivcp's one-line errors.

``python tests/vllm_checks.py --suite DIR``: everything tests/test_vllm.py asserts, in ONE process so
that vLLM is imported once and the engines run in it (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the checks
above, then the parity runs of scripts/vllm_parity.py (one engine per model, all its methods in one
mixed batch), the plugin-off run and the server check; each section's output goes to DIR/<name>.log,
its exit status to DIR/<name>.rc.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import re

if sys.argv[1:2] == ["--suite"]:  # engines in this process (before vLLM is imported)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ROOT = Path(__file__).resolve().parent.parent

# the parity runs: (section, vllm_parity.py arguments). The first method of each run is the model's
# (engine_args), the others come per request (mm_processor_kwargs), all in one batch.
PATTERNS = [["ivc_prune", {"pattern": p}, 5] for p in ("corners", "window", "diagonal", "random")]
RUNS = {
    "grounder": ["--methods", json.dumps([["ivc_prune", {}, 50], ["random", {"keep_ratio": 0.3}, 10], *PATTERNS,
                                          ["ivc_prune", {"pattern": "window", "use_foreground": False}, 5],
                                          ["drop_ivc", {}, 10], ["ivc_prune", {"use_foreground": False}, 5],
                                          ["none", {}, 10]]), "--request-errors"],
    "qwen2_vl": ["--family", "qwen2_vl", "--methods", json.dumps([["ivc_prune", {}, 10], ["random", {"keep_ratio": 0.3}, 5],
                                                                  ["none", {}, 5]])],
    # selection_layer 1: the deepstack features of levels 1 and 2 reach the kept tokens after K
    "qwen3_vl": ["--family", "qwen3_vl", "--methods", json.dumps([["ivc_prune", {}, 50], ["ivc_prune", {"selection_layer": 1}, 10],
                                                                  ["random", {"keep_ratio": 0.3}, 5], ["drop_ivc", {}, 10],
                                                                  ["none", {}, 5]])],
    "plugin_off": ["--method", "none", "--n", "5"],
}


from ivcp.vllm import engine_args  # noqa: E402
from ivcp.adapters import RopeSpec  # noqa: E402
from ivcp.vllm.method import kept_visual_count, needs_position, resolve  # noqa: E402
from ivcp.vllm.pruned import check_engine, request_spec  # noqa: E402


def raises(match: str, fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except ValueError as error:
        if not re.search(match, str(error)):
            raise AssertionError(f"{fn.__name__}{args}: error {error!r} does not say {match!r}") from error
        if "\n" in str(error):
            raise AssertionError(f"{fn.__name__}{args}: the error is not one line: {error!r}")
        return
    raise AssertionError(f"{fn.__name__}{args} {kwargs} raised nothing; expected an error saying {match!r}")


def ivc_set_by_hand(base: int, grid_h: int, grid_w: int, rope, ratio: float) -> set[int]:
    """Top round(ratio·N) by V(m) = Σ_s Σ_k cos(p_s(m)·θ_k) ∪ top by U (sin), ties to the earlier token."""
    import math

    freqs = [rope.theta ** (-2 * k / rope.head_dim) for k in range(rope.head_dim // 2)]
    tokens = [(r, c) for r in range(grid_h) for c in range(grid_w)]
    streams = [[base, base + r, base + c] for r, c in tokens]  # t, h, w ids of an image from its first id
    v = [sum(sorted(sum(math.cos(p * f) for f in freqs) for p in ps)) for ps in streams]
    u = [sum(sorted(sum(math.sin(p * f) for f in freqs) for p in ps)) for ps in streams]
    k = round(ratio * len(tokens))
    top = lambda scores: sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]  # noqa: E731
    return set(top(v)) | set(top(u))


def engine(tp=1, pp=1, prefix=False, chunked=False, video_pruning=False):
    return SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp),
        cache_config=SimpleNamespace(enable_prefix_caching=prefix),
        scheduler_config=SimpleNamespace(enable_chunked_prefill=chunked),
        model_config=SimpleNamespace(multimodal_config=SimpleNamespace(
            is_multimodal_pruning_enabled=lambda: video_pruning)))


def main() -> None:
    # names and parameters: ivcp.prune's own errors
    raises("unknown method", resolve, "qwen2_5_vl", 4, 128, "no_such_method")
    raises("keep_ratio must be in", resolve, "qwen2_5_vl", 4, 128, "ivc_prune", {"keep_ratio": 2.0})
    raises("selection layer 9 is out of range", resolve, "qwen2_5_vl", 4, 128, "ivc_prune", {"selection_layer": 9})
    raises("budget_mode must be one of", resolve, "qwen2_5_vl", 4, 128, "ivc_prune", {"budget_mode": "x"})
    print("ok names_and_params")
    # what the plugin cannot serve exactly: refused, with the reason
    raises("not 'fastv'", resolve, "qwen2_5_vl", 4, 128, "fastv")
    raises("trim_layer0_kv=False is not served", resolve, "qwen2_5_vl", 4, 128, "ivc_prune", {"trim_layer0_kv": False})
    raises("depends on the picture", resolve, "qwen2_5_vl", 4, 128, "ivc_prune", {"budget_mode": "paper_union"})
    raises("serves qwen2_5_vl, qwen2_vl, qwen3_vl", resolve, "llava", 4, 128, "ivc_prune")
    raises("not 'Llava", engine_args, "ivc_prune", architecture="LlavaForConditionalGeneration")
    print("ok refused_methods")
    # kept counts from the grid alone (a hand-worked budget: round(0.5 * 64) = 32; random 0.3 of 80 = 24)
    assert kept_visual_count(resolve("qwen2_5_vl", 4, 128, "ivc_prune"), 8, 8) == 32
    assert kept_visual_count(resolve("qwen2_5_vl", 4, 128, "random", {"keep_ratio": 0.3}), 8, 10) == 24
    assert kept_visual_count(resolve("qwen2_5_vl", 4, 128, "ivc_prune", {"pattern": "corners",
                                                                      "use_foreground": False}), 8, 8) == 5
    raises("fit that budget", kept_visual_count, resolve("qwen2_5_vl", 4, 128, "ivc_prune", {"keep_ratio": 0.1}), 8, 8)
    print("ok kept_counts")
    # counts that depend on the image's first M-RoPE id (drop_ivc: N − |IVC|; IVC tokens alone: |IVC|),
    # against V / U summed by hand over the three streams (eq. 7, 8; the authors' reference mode)
    rope = RopeSpec(theta=1_000_000.0, head_dim=16, mrope_section=(2, 3, 3))
    drop = resolve("qwen2_5_vl", 4, 128, "drop_ivc", {"ivc_ratio": 0.1})
    alone = resolve("qwen2_5_vl", 4, 128, "ivc_prune", {"use_foreground": False, "ivc_ratio": 0.1})
    assert needs_position(drop) and needs_position(alone)
    assert not needs_position(resolve("qwen2_5_vl", 4, 128, "ivc_prune"))
    raises("depends on the image's position", kept_visual_count, drop, 8, 8)
    sizes = set()
    for base in (0, 3, 27, 45):
        union = ivc_set_by_hand(base, 8, 8, rope, 0.1)
        assert kept_visual_count(drop, 8, 8, base=base, rope=rope) == 64 - len(union)
        assert kept_visual_count(alone, 8, 8, base=base, rope=rope) == len(union)
        sizes.add(len(union))
    assert len(sizes) > 1, "the IVC set's size should depend on the image's position here"
    print("ok position_counts")
    # engine settings: prefix caching, chunked prefill, tensor / pipeline parallelism, vLLM's own pruning
    check_engine(engine())
    raises("enable_prefix_caching=False", check_engine, engine(prefix=True))
    raises("enable_chunked_prefill=False", check_engine, engine(chunked=True))
    raises("tensor_parallel_size=1", check_engine, engine(tp=2))
    raises("tensor_parallel_size=1", check_engine, engine(pp=2))
    raises("video_pruning_rate", check_engine, engine(video_pruning=True))
    args = engine_args("ivc_prune", keep_ratio=0.25)
    assert args["enable_prefix_caching"] is False and args["enable_chunked_prefill"] is False
    assert args["hf_overrides"] == {"architectures": ["IvcpQwen2_5_VLForConditionalGeneration"],
                                    "ivcp_method": "ivc_prune", "ivcp_params": {"keep_ratio": 0.25}}
    print("ok engine_settings")
    # the per-request channel (mm_processor_kwargs): its own errors; the model's method without it
    config = SimpleNamespace(ivcp_method="ivc_prune", ivcp_params={"keep_ratio": 0.25})
    assert request_spec(config, {}) == ("ivc_prune", {"keep_ratio": 0.25})
    kwargs = {"ivcp_method": "random", "ivcp_params": {"keep_ratio": 0.3}, "fps": 2}
    assert request_spec(config, kwargs) == ("random", {"keep_ratio": 0.3}) and kwargs == {"fps": 2}
    assert request_spec(config, {"ivcp_method": "none"}) == (None, {})
    raises("ivcp_params without ivcp_method", request_spec, config, {"ivcp_params": {"keep_ratio": 0.3}})
    raises("must be a dict", request_spec, config, {"ivcp_method": "random", "ivcp_params": 0.3})
    raises("takes no ivcp_params", request_spec, config, {"ivcp_method": "none", "ivcp_params": {"keep_ratio": 0.3}})
    print("ok request_specs")



def suite(out: Path) -> int:
    """Run every section, each one's output to ``out/<name>.log``; 0 if all passed."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    sys.path.insert(0, str(ROOT / "scripts"))
    out.mkdir(parents=True, exist_ok=True)
    import gc

    import vllm_parity
    import vllm_serve_check

    folders = {"grounder": out / "grounder", "qwen2_vl": out / "qwen2_vl", "qwen3_vl": out / "qwen3_vl"}
    sections = [("checks", main)]
    for name, args in RUNS.items():
        folder = folders.get(name, folders["grounder"])
        sections.append((name, lambda args=args, folder=folder: vllm_parity.main([*args, "--model-dir", str(folder)])))
    sections.append(("serve", lambda: vllm_serve_check.main(["--n", "2", "--model-dir", str(folders["grounder"])])))
    failed = 0
    for name, run in sections:
        started = time.perf_counter()
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            try:
                rc = run() or 0
            except Exception:  # noqa: BLE001 - reported in the section's log
                traceback.print_exc(file=buffer)
                rc = 1
        gc.collect()
        seconds = time.perf_counter() - started
        (out / f"{name}.log").write_text(buffer.getvalue())
        (out / f"{name}.rc").write_text(str(rc))
        print(f"{name}: exit {rc} in {seconds:.0f} s", flush=True)
        failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--suite"]:
        sys.exit(suite(Path(sys.argv[2])))
    main()
