"""Checks run inside the vLLM environment by tests/test_vllm.py (one process: no engine is started; not a
pytest module: the vLLM environment has no pytest).

Each check prints "ok <name>" or raises; bad names / parameters and refused engine settings must fail
with ivcp's one-line errors."""

from __future__ import annotations

from types import SimpleNamespace

import re

from ivcp.vllm import engine_args
from ivcp.vllm.method import kept_visual_count, resolve
from ivcp.vllm.qwen2_5_vl import check_engine


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
    raises("serves qwen2_5_vl", resolve, "llava", 4, 128, "ivc_prune")
    raises("not 'Llava", engine_args, "ivc_prune", architecture="LlavaForConditionalGeneration")
    print("ok refused_methods")
    # kept counts from the grid alone (a hand-worked budget: round(0.5 * 64) = 32; random 0.3 of 80 = 24)
    assert kept_visual_count(resolve("qwen2_5_vl", 4, 128, "ivc_prune"), 8, 8) == 32
    assert kept_visual_count(resolve("qwen2_5_vl", 4, 128, "random", {"keep_ratio": 0.3}), 8, 10) == 24
    assert kept_visual_count(resolve("qwen2_5_vl", 4, 128, "ivc_prune", {"pattern": "corners",
                                                                      "use_foreground": False}), 8, 8) == 5
    raises("fit that budget", kept_visual_count, resolve("qwen2_5_vl", 4, 128, "ivc_prune", {"keep_ratio": 0.1}), 8, 8)
    print("ok kept_counts")
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


if __name__ == "__main__":
    main()
