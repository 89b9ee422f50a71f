"""Model × method settings from ``configs/models/<family>.toml``.

Lookup order for a method parameter: what the caller passed, then the model size's section, then
the family's ``[defaults.<method>]``, then the method dataclass's own default.
"""

from __future__ import annotations

import functools
try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib
from importlib import resources
from pathlib import Path
from typing import Any


def _configs():
    """The configs/ folder: installed as the package data `ivcp.configs` (pyproject maps the top-level
    configs/ onto it), or read from the source tree when running from a checkout."""
    try:
        installed = resources.files("ivcp.configs")
        if installed.joinpath("models").is_dir():
            return installed
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "configs"


def config_file(folder: str, name: str):
    """A file of configs/<folder>/ (a Path or an importlib Traversable: use is_file / read_text)."""
    return _configs().joinpath(folder).joinpath(name)


def config_names(folder: str, suffix: str) -> list[str]:
    """Stems of the files of configs/<folder>/ ending in ``suffix``."""
    entries = _configs().joinpath(folder).iterdir()
    return sorted(e.name[: -len(suffix)] for e in entries if e.name.endswith(suffix))


def _config_file(family: str):
    return config_file("models", f"{family}.toml")


@functools.lru_cache(maxsize=None)
def family_config(family: str) -> dict[str, Any]:
    """The parsed TOML of one family ({} when the family has no file)."""
    path = _config_file(family)
    if not path.is_file():
        return {}
    return tomllib.loads(path.read_text(encoding="utf-8"))


def model_size(family: str, num_hidden_layers: int, hidden_size: int) -> str | None:
    """Name of the released size with this depth and width, if the family's config lists it."""
    for name, size in family_config(family).get("sizes", {}).items():
        if size.get("num_hidden_layers") == num_hidden_layers and size.get("hidden_size") == hidden_size:
            return name
    return None


def method_defaults(family: str, method: str, num_hidden_layers: int, hidden_size: int) -> dict[str, Any]:
    """Model-dependent defaults of ``method`` for this model (``selection_depth`` resolved)."""
    config = family_config(family)
    merged = dict(config.get("defaults", {}).get(method, {}))
    size = model_size(family, num_hidden_layers, hidden_size)
    if size is not None:
        merged.update(config["sizes"][size].get(method, {}))
    # `<name>_depth` (a fraction of the depth) becomes `<name>_layer`, `<name>_depths` → `<name>_layers`
    for key in [k for k in merged if k.endswith(("_depth", "_depths"))]:
        fraction = merged.pop(key)
        target = key.replace("_depths", "_layers").replace("_depth", "_layer")
        if target in merged:
            continue
        to_layer = lambda f: min(max(int(round(f * num_hidden_layers)), 1), num_hidden_layers - 1)  # noqa: E731
        merged[target] = tuple(to_layer(f) for f in fraction) if isinstance(fraction, list) else to_layer(fraction)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()}


def authors_params(family: str, method: str) -> dict[str, Any]:
    """The authors' own settings of ``method`` for a family (``[authors.<method>]``: their code's
    choices where they differ from ivcp's defaults), {} when there are none."""
    params = family_config(family).get("authors", {}).get(method, {})
    return {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}


def family_rope(family: str):
    """The released checkpoints' decoder rotary parameters of a family (``[rope]`` in its config)."""
    from .adapters.base import RopeSpec

    from .adapters import available_adapters

    rope = family_config(family).get("rope")
    if rope is None:
        raise ValueError(f"no rotary parameters for model family {family!r}; known: {', '.join(available_adapters())}")
    section = rope.get("mrope_section")
    return RopeSpec(float(rope["theta"]), int(rope["head_dim"]), tuple(section) if section else None,
                    bool(rope.get("interleaved", False)))


@functools.lru_cache(maxsize=None)
def eval_config() -> dict[str, Any]:
    """configs/eval.toml: the evaluation harness's methods, model names and generation settings."""
    return tomllib.loads(_configs().joinpath("eval.toml").read_text(encoding="utf-8"))
