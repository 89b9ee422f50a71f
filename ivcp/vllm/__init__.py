"""ivcp inside vLLM: an out-of-tree plugin that serves Qwen2.5-VL with a pruning method applied inside
the LLM, exactly as ivcp's Hugging Face path does (docs/vllm.md).

Installed with ivcp, the plugin is found by vLLM through the ``vllm.general_plugins`` entry point
(:func:`register`). A model is served pruned when loaded with :func:`engine_args`::

    from vllm import LLM
    from ivcp.vllm import engine_args
    llm = LLM(model="/models/Qwen2.5-VL-7B-Instruct", **engine_args("ivc_prune", keep_ratio=0.5))

Importing this package does not import vLLM; :mod:`ivcp.vllm.qwen2_5_vl` does.
"""

from __future__ import annotations

from typing import Any

ARCHITECTURES = {"Qwen2_5_VLForConditionalGeneration": "IvcpQwen2_5_VLForConditionalGeneration",
                 "Qwen2VLForConditionalGeneration": "IvcpQwen2VLForConditionalGeneration",
                 "Qwen3VLForConditionalGeneration": "IvcpQwen3VLForConditionalGeneration"}
MODULES = {"IvcpQwen2_5_VLForConditionalGeneration": "qwen2_5_vl", "IvcpQwen2VLForConditionalGeneration": "qwen2_5_vl",
           "IvcpQwen3VLForConditionalGeneration": "qwen3_vl"}


def register() -> None:
    """vLLM's plugin hook: register ivcp's model classes (loaded lazily, by name)."""
    from vllm import ModelRegistry

    for ours in ARCHITECTURES.values():
        if ours not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(ours, f"ivcp.vllm.{MODULES[ours]}:{ours}")


def engine_args(method: str | None = "ivc_prune", architecture: str = "Qwen2_5_VLForConditionalGeneration",
                **params: Any) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` (or ``vllm serve``'s flags: docs/vllm.md) that serve a model of
    ``architecture`` pruned by ``method`` with ``params`` (None: the plugin's class, unpruned). Bad names
    and parameters raise ivcp's own errors when the model loads."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"ivcp's vLLM plugin serves {', '.join(ARCHITECTURES)}, not {architecture!r}")
    overrides: dict[str, Any] = {"architectures": [ARCHITECTURES[architecture]]}
    if method is not None:
        overrides.update(ivcp_method=method, ivcp_params=params)
    elif params:
        raise ValueError("parameters given without a method")
    return {"hf_overrides": overrides, "enable_prefix_caching": False, "enable_chunked_prefill": False}
