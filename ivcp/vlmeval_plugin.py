"""VLMEvalKit plugin: ivcp's pruned models and its grounding datasets, registered into a
pip-installed VLMEvalKit (``ms-vlmeval`` or an upstream checkout) through its public surface only:
``vlmeval.vlm.base.BaseModel``, ``vlmeval.config.supported_VLM``, ``vlmeval.dataset.DATASET_CLASSES``
and ``vlmeval.run.main``. Nothing of VLMEvalKit is copied or patched.

    import ivcp.vlmeval_plugin as plugin
    plugin.register()          # then VLMEvalKit's own entry point, e.g. vlmeval.run.main()

Only this module imports VLMEvalKit; ``import ivcp`` never does.
"""

from __future__ import annotations

import contextlib
import json
import os
import os.path as osp
import re
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from vlmeval.dataset.image_base import ImageBaseDataset
from vlmeval.smp import LMUDataRoot, dump, load
from vlmeval.vlm.base import BaseModel

import ivcp

from .config import eval_config
from .eval.grounding import FAMILY_CONVENTION, GROUNDING_SPLITS, grounding_prompt, grounding_scores, parse_box, smart_resize

# --- models -------------------------------------------------------------------------------------

_EVAL = eval_config()
# VLMEvalKit name suffix → (ivcp method, its parameters); "" is the unpruned model (configs/eval.toml)
METHOD_SUFFIXES = {entry["suffix"]: (None if name == "vanilla" else name, dict(entry.get("params", {})))
                   for name, entry in _EVAL["methods"].items()}
METHOD_SUFFIXES.update({alias: (name, dict(_EVAL["methods"][name].get("params", {})))
                        for alias, name in _EVAL.get("suffix_aliases", {}).items()})
# base name → (family, hub id or "tiny:<family>")
BASE_MODELS = {name: (entry["family"], entry["hub_id"]) for name, entry in _EVAL["models"].items()}
GENERATION, TINY = _EVAL["generation"], _EVAL["tiny"]
MIN_PIXELS, MAX_PIXELS = GENERATION["min_pixels"], GENERATION["max_pixels"]
TINY_PIXELS = (TINY["min_pixels"], TINY["max_pixels"])
TINY_MAX_NEW_TOKENS = TINY["max_new_tokens"]


def weights_for(base: str, hub_id: str) -> str:
    """A local directory under ``$IVCP_MODEL_ROOT`` when it exists (named like the model or its hub
    repository), else the hub id (transformers honours ``HF_HUB_OFFLINE``)."""
    if hub_id.startswith("tiny"):
        return hub_id
    root = os.environ.get("IVCP_MODEL_ROOT")
    if root:
        for name in (base, hub_id.split("/")[-1], hub_id):
            if osp.isdir(osp.join(root, name)):
                return osp.join(root, name)
    return hub_id


class IVCPQwenVL(BaseModel):
    """A Qwen2-VL / Qwen2.5-VL model answered through ``ivcp.prune`` (or unpruned).

    Greedy decoding; grounding prompts as the paper. Every answer's pruning statistics go to
    ``$IVCP_STATS_DIR/<model name>/<dataset>.jsonl`` (default ``outputs/ivcp_stats``) so tables can
    report "Average Tokens". Runs on CPU when there is no GPU; flash-attn only when installed.
    """

    INSTALL_REQ = False
    INTERLEAVE = True
    calls = 0  # generate() calls in this process (for tests of resuming)

    def __init__(self, model_path: str, name: str = "ivcp", family: str = "qwen2_5_vl", method: str | None = None,
                 method_params: dict | None = None, max_new_tokens: int = GENERATION["max_new_tokens"],
                 min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS, **kwargs):
        from .loading import load_model

        super().__init__()
        self.name, self.family, self.method = name, family, method
        self.method_params = dict(method_params or {})
        self.max_new_tokens = max_new_tokens
        if model_path.startswith("tiny"):
            from .testing import tiny_processor

            self.model, _ = load_model(model_path)
            self.min_pixels, self.max_pixels = TINY_PIXELS
            self.processor = tiny_processor(family, *TINY_PIXELS)
            self.max_new_tokens = min(max_new_tokens, TINY_MAX_NEW_TOKENS)  # random weights never stop
        else:
            self.model, self.processor = _load_real(model_path, min_pixels, max_pixels)
            self.min_pixels, self.max_pixels = min_pixels, max_pixels
        if method is not None:  # bad names or parameters fail now, before any sample
            ivcp.resolve_method(self.model, method, **self.method_params)

    def generate_inner(self, message, dataset=None) -> str:
        from PIL import Image

        type(self).calls += 1
        content, images = [], []
        for item in message:
            if item["type"] == "image":
                images.append(Image.open(item["value"]).convert("RGB"))
                content.append({"type": "image"})
            elif item["type"] == "text":
                content.append({"type": "text", "text": item["value"]})
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=False)
        inputs = self.processor(text=[text], images=images or None, return_tensors="pt")
        inputs = {k: v.to(self.model.device) if hasattr(v, "to") else v for k, v in dict(inputs).items()}
        context = contextlib.nullcontext(None) if self.method is None else \
            ivcp.prune(self.model, self.method, **self.method_params)
        with torch.no_grad(), context as session:
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        n_prompt = inputs["input_ids"].shape[1]
        answer = self.processor.batch_decode(out[:, n_prompt:], skip_special_tokens=True)[0]
        self._record(dataset, session.last if session is not None else None, inputs)
        return answer

    def _record(self, dataset, record, inputs) -> None:
        n_visual = int(torch.isin(inputs["input_ids"], torch.tensor(
            [self.model.config.image_token_id, self.model.config.video_token_id], device=inputs["input_ids"].device)).sum())
        stats = {"n_visual": n_visual,
                 "n_visual_kept": record.n_visual_kept if record is not None else n_visual,
                 "visual_kv_share": record.visual_kv_share if record is not None else 1.0}
        folder = Path(os.environ.get("IVCP_STATS_DIR", "outputs/ivcp_stats")) / self.name
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{dataset or 'none'}.jsonl", "a") as handle:
            handle.write(json.dumps(stats) + "\n")


def _load_real(path: str, min_pixels: int, max_pixels: int):
    import importlib.util

    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    flash = device == "cuda" and importlib.util.find_spec("flash_attn") is not None
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        attn_implementation="flash_attention_2" if flash else "sdpa")
    processor = AutoProcessor.from_pretrained(path, min_pixels=min_pixels, max_pixels=max_pixels)
    return model.to(device).eval(), processor


def model_registry() -> dict[str, partial]:
    """Every model name ivcp adds to VLMEvalKit: each base model × each method suffix."""
    models = {}
    for base, (family, hub_id) in BASE_MODELS.items():
        for suffix, (method, params) in METHOD_SUFFIXES.items():
            name = base + suffix
            models[name] = partial(IVCPQwenVL, model_path=weights_for(base, hub_id), name=name, family=family,
                                   method=method, method_params=params)
    return models


def model_info(model_name: str) -> tuple[str, tuple[int, int]]:
    """(family, (min_pixels, max_pixels)) of a registered model name (the longest matching prefix)."""
    for base in sorted(BASE_MODELS, key=len, reverse=True):
        if model_name.startswith(base):
            family = BASE_MODELS[base][0]
            return family, TINY_PIXELS if BASE_MODELS[base][1].startswith("tiny") else (MIN_PIXELS, MAX_PIXELS)
    raise ValueError(f"{model_name!r} is not one of ivcp's models")


# --- grounding datasets ---------------------------------------------------------------------------

class IVCPGrounding(ImageBaseDataset):
    """RefCOCO / RefCOCO+ / RefCOCOg splits read from ``$LMUData/<split>.tsv`` or from the upstream
    aggregated ``RefCOCO.tsv`` (split by its ``category`` column). Never downloads or deletes data."""

    TYPE = "GROUNDING"
    MODALITY = "IMAGE"

    @classmethod
    def supported_datasets(cls):
        return list(GROUNDING_SPLITS)

    def load_data(self, dataset):
        root = LMUDataRoot()
        path = osp.join(root, f"{dataset}.tsv")
        if osp.exists(path):
            return load(path)
        aggregated = osp.join(root, "RefCOCO.tsv")
        if not osp.exists(aggregated):
            raise FileNotFoundError(
                f"{dataset}: neither {path} nor {aggregated} exists. Put the TSVs in $LMUData, or make "
                f"synthetic ones with `ivcp data make-grounding --out {root}`.")
        data = load(aggregated)
        if "category" not in data:
            raise KeyError(f"{aggregated} has no `category` column to split it by")
        split = data["category"].astype(str).str.strip().str.replace(r"\s+", "_", regex=True)
        data = data[split == dataset].reset_index(drop=True)
        if data.empty:
            raise ValueError(f"{aggregated} holds no rows of {dataset}")
        return data

    def build_prompt(self, line):
        if isinstance(line, int):
            line = self.data.iloc[line]
        paths = self.dump_image(line)
        return [dict(type="image", value=p) for p in paths] + [dict(type="text", value=grounding_prompt(line["question"]))]

    def evaluate(self, eval_file, **judge_kwargs):
        data = load(eval_file)
        model_name = _model_from_eval_file(eval_file, self.dataset_name)
        family, (min_pixels, max_pixels) = model_info(model_name)
        rows, unparsed = [], []
        for _, row in data.iterrows():
            width, height = int(row["width"]), int(row["height"])
            rh, rw = smart_resize(height, width, 28, min_pixels, max_pixels)
            parsed = parse_box(str(row["prediction"]), FAMILY_CONVENTION[family], (width, height), (rw, rh))
            gt = tuple(float(row[k]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
            rows.append({"split": self.dataset_name, "prediction": parsed, "gt": gt})
            if parsed.box is None:
                unparsed.append({"index": row["index"], "prediction": str(row["prediction"])[:200], "reason": parsed.reason})
        scores = grounding_scores(rows)[self.dataset_name]
        share = average_tokens(model_name, self.dataset_name)
        result = pd.DataFrame([{"split": self.dataset_name, "Acc@0.5": scores["acc"], "mIoU": scores["miou"],
                                "n": scores["n"], "unparsed": scores["unparsed"], "avg_tokens": share}])
        stem = osp.splitext(eval_file)[0]
        dump(result, f"{stem}_acc.csv")
        if unparsed:
            dump(pd.DataFrame(unparsed), f"{stem}_unparsed.csv")
        return result


def _model_from_eval_file(eval_file: str, dataset: str) -> str:
    base = osp.basename(eval_file)
    match = re.match(rf"(.+)_{re.escape(dataset)}\.\w+$", base)
    if match is None:
        raise ValueError(f"cannot tell the model from the prediction file name {base!r}")
    return match.group(1)


def average_tokens(model_name: str, dataset: str) -> float | None:
    """Mean share of visual KV kept over a run's answers (None when no statistics were recorded)."""
    path = Path(os.environ.get("IVCP_STATS_DIR", "outputs/ivcp_stats")) / model_name / f"{dataset}.jsonl"
    if not path.is_file():
        return None
    shares = [json.loads(line)["visual_kv_share"] for line in path.read_text().splitlines() if line.strip()]
    return sum(shares) / len(shares) if shares else None


# --- registration ---------------------------------------------------------------------------------

def register() -> list[str]:
    """Add ivcp's models and datasets to the installed VLMEvalKit (idempotent); returns the model names."""
    import vlmeval.dataset as datasets
    from vlmeval.config import supported_VLM

    models = model_registry()
    supported_VLM.update(models)
    if IVCPGrounding not in datasets.DATASET_CLASSES:
        datasets.DATASET_CLASSES.insert(0, IVCPGrounding)  # before upstream's RefCOCO handling
    for name in IVCPGrounding.supported_datasets():
        if name not in datasets.SUPPORTED_DATASETS:
            datasets.SUPPORTED_DATASETS.append(name)
    return list(models)
