"""The evaluation protocol: which models, which settings, which names (from ``configs/eval.toml``).

No VLMEvalKit here: the plugin, the scripts and the result tables all read these definitions, so a
model name means the same thing everywhere. A VLMEvalKit model name is

    <model><method suffix><prompt-protocol suffix>     e.g. Qwen2.5-VL-7B-Instruct_IVCP
                                                            Qwen2.5-VL-7B-Instruct_DatasetPrompt

(the default protocol, ``authors``, has no suffix).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import eval_config

_EVAL = eval_config()
PROTOCOLS: dict[str, str] = {name: entry["suffix"] for name, entry in _EVAL["prompts"]["protocols"].items()}
DEFAULT_PROTOCOL: str = _EVAL["prompts"]["default"]
GENERATION: dict[str, Any] = dict(_EVAL["generation"])
METHODS: dict[str, dict] = _EVAL["methods"]
# method suffix -> harness method entry (configs/eval.toml [methods.<entry>])
ENTRY_BY_SUFFIX: dict[str, str] = {entry["suffix"]: name for name, entry in METHODS.items()}
ENTRY_BY_SUFFIX.update(_EVAL.get("suffix_aliases", {}))
BUDGET_METHODS: tuple[str, ...] = tuple(_EVAL.get("budgets", {}).get("methods", ()))
BUDGETS: dict[str, float] = dict(_EVAL.get("budgets", {}).get("keep_ratios", {}))  # budget suffix -> keep ratio
# entry -> budget suffix -> its parameters, for the methods without a keep ratio (PDrop)
BUDGET_PARAMS: dict[str, dict[str, dict]] = dict(_EVAL.get("budgets", {}).get("params", {}))


def ivcp_method(entry: str) -> str | None:
    """The ivcp method a harness entry runs (None: the unpruned model)."""
    return None if entry == "vanilla" else METHODS[entry].get("method", entry)


@dataclass(frozen=True)
class ModelEntry:
    """One model of configs/eval.toml."""

    name: str
    family: str
    hub_id: str  # or "tiny:<what>" for the offline models
    min_pixels: int | None  # image pixel bounds (Qwen-VL); None where the family resizes to a fixed size
    max_pixels: int | None
    generation: dict = field(default_factory=dict)  # [generation] with this model's overrides
    paper_label: str = ""
    dtype: str = "bfloat16"  # on GPU (the CPU runs float32)

    @property
    def offline(self) -> bool:
        return self.hub_id.startswith("tiny:")


def _entry(name: str, raw: dict) -> ModelEntry:
    generation = dict(GENERATION)
    if "max_new_tokens" in raw:
        generation["max_new_tokens"] = raw["max_new_tokens"]
    generation.update(raw.get("generation", {}))
    pixels = [int(raw[k]) if k in raw else None for k in ("min_pixels", "max_pixels")]
    return ModelEntry(name, raw["family"], raw["hub_id"], *pixels, generation, raw.get("paper_label", ""),
                      raw.get("dtype", "bfloat16"))


MODELS: dict[str, ModelEntry] = {name: _entry(name, raw) for name, raw in _EVAL["models"].items()}


@dataclass(frozen=True)
class RunName:
    """What a VLMEvalKit model name stands for."""

    name: str
    model: ModelEntry
    method: str | None  # the ivcp method (None: unpruned)
    method_params: dict
    protocol: str


def method_params(entry: str, family: str) -> dict:
    """The harness's parameters of a method entry on top of the model's defaults: the entry's
    ``params`` (configs/eval.toml) and, for an ``authors = true`` entry, the family's
    ``[authors.<method>]`` settings (configs/models/<family>.toml)."""
    from ..config import authors_params

    spec = METHODS[entry]
    params = dict(spec.get("params", {}))
    if spec.get("authors"):
        params.update(authors_params(family, ivcp_method(entry)))
    return params


def budget_params(entry: str, budget: str) -> dict:
    """The parameters that put a harness entry at a budget (``budget``: a suffix of [budgets], e.g. "_Keep33"):
    ``keep_ratio``, or the entry's own settings in [budgets.params.<entry>] (PDrop's stages)."""
    if entry in BUDGET_PARAMS:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in BUDGET_PARAMS[entry][budget].items()}
    return {"keep_ratio": BUDGETS[budget]}


def run_name(model: str, method: str = "vanilla", protocol: str = DEFAULT_PROTOCOL) -> str:
    """The VLMEvalKit model name of ``model`` run with ``method`` under a prompt ``protocol``.
    ``method`` is a harness entry (configs/eval.toml [methods]), optionally with a budget:
    ``fastv:Keep33``."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; ivcp's models: {', '.join(MODELS)}")
    entry, _, budget = method.partition(":")
    if entry not in METHODS:
        raise ValueError(f"unknown method {entry!r} for the harness; known: {', '.join(METHODS)}")
    if budget and ("_" + budget not in BUDGETS or entry not in BUDGET_METHODS):
        raise ValueError(f"unknown budget {method!r}; budgets {', '.join(b[1:] for b in BUDGETS)} for "
                         f"{', '.join(BUDGET_METHODS)} (configs/eval.toml [budgets])")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown prompt protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    return model + METHODS[entry]["suffix"] + (f"_{budget}" if budget else "") + PROTOCOLS[protocol]


def all_run_names() -> dict[str, RunName]:
    """Every name ivcp registers: each model × each method suffix (aliases too) × each protocol."""
    names = {}
    for model in MODELS.values():
        for suffix, entry in ENTRY_BY_SUFFIX.items():
            for budget in [""] + (list(BUDGETS) if entry in BUDGET_METHODS else []):
                params = method_params(entry, model.family)
                if budget:
                    params.update(budget_params(entry, budget))
                for protocol, protocol_suffix in PROTOCOLS.items():
                    name = model.name + suffix + budget + protocol_suffix
                    names[name] = RunName(name, model, ivcp_method(entry), params, protocol)
    return names


def parse_run_name(name: str) -> RunName:
    """The model, method and protocol of a registered name (ValueError naming the known ones if not)."""
    names = all_run_names()
    if name not in names:
        close = sorted(n for n in names if n.split("_")[0] == name.split("_")[0])[:8]
        raise ValueError(f"{name!r} is not one of ivcp's model names"
                         + (f"; e.g. {', '.join(close)}" if close else f"; models: {', '.join(MODELS)}"))
    return names[name]


def generate_kwargs(generation: dict) -> dict:
    """Keyword arguments for ``model.generate`` from a [generation] table: every setting explicit, so
    the checkpoint's generation_config (e.g. Qwen2.5-VL's repetition_penalty 1.05) cannot leak in."""
    kwargs = {"max_new_tokens": int(generation["max_new_tokens"]), "do_sample": bool(generation["do_sample"]),
              "repetition_penalty": float(generation["repetition_penalty"])}
    if not kwargs["do_sample"]:  # greedy: neutral sampling settings, so none is carried over or warned about
        kwargs.update(temperature=1.0, top_p=1.0, top_k=50)
    return kwargs
