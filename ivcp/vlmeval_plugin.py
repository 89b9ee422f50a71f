"""VLMEvalKit plugin: ivcp's pruned models and its grounding datasets, registered into a
pip-installed VLMEvalKit (``ms-vlmeval`` or an upstream checkout) through its public surface only:
``vlmeval.vlm.base.BaseModel`` (and ``Qwen2VLChat`` / ``Qwen2VLPromptMixin``, subclassed, never
patched), ``vlmeval.config.supported_VLM``, ``vlmeval.dataset.DATASET_CLASSES`` and
``vlmeval.run.main``. Nothing of VLMEvalKit is copied or patched.

    import ivcp.vlmeval_plugin as plugin
    plugin.register()          # then VLMEvalKit's own entry point, e.g. vlmeval.run.main()

Inputs are exactly the authors' (FireRedTeam/IVC-Prune's Qwen2VLChat): prompts from VLMEvalKit's
``Qwen2VLPromptMixin`` under the ``authors`` protocol (or the datasets' own under ``dataset``), the
chat template with its default system prompt, images first and resized by ``qwen_vl_utils`` within
the entry's pixel bounds, generation settings of ``configs/eval.toml`` passed explicitly.
Only this module imports VLMEvalKit; ``import ivcp`` never does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os.path as osp
import re

import pandas as pd
import torch
from vlmeval.dataset.image_base import ImageBaseDataset
from vlmeval.smp import dump, load
from vlmeval.vlm.base import BaseModel
from vlmeval.vlm.internvl.internvl_chat import InternVLChat
from vlmeval.vlm.internvl.utils import reorganize_prompt
from vlmeval.vlm.llava.llava import LLaVA
from vlmeval.vlm.qwen2_vl.model import Qwen2VLChat
from vlmeval.vlm.qwen2_vl.prompt import Qwen2VLPromptMixin
from vlmeval.vlm.qwen3_vl.model import Qwen3VLChat
from vlmeval.vlm.qwen3_vl.prompt import Qwen3VLPromptMixin

import ivcp

from .eval import stats
from .eval.grounding import (FAMILY_CONVENTION, GROUNDING_SPLITS, check_grounding_rows, ground_truth, grounding_layout,
                             grounding_prompt, grounding_scores, paper_iou, paper_prediction, parse_box, smart_resize)
from .eval.protocol import MODELS, all_run_names, generate_kwargs, parse_run_name

# --- models -------------------------------------------------------------------------------------


def weights_for(model: str, hub_id: str) -> str:
    """A local directory under ``$IVCP_MODEL_ROOT`` when it exists (named like the model or its hub
    repository), else the hub id (transformers honours ``HF_HUB_OFFLINE``)."""
    import os

    if hub_id.startswith("tiny"):
        return hub_id
    root = os.environ.get("IVCP_MODEL_ROOT")
    if root:
        for name in (model, hub_id.split("/")[-1], hub_id):
            if osp.isdir(osp.join(root, name)):
                return osp.join(root, name)
    return hub_id


class IVCPModelMixin:
    """What every ivcp wrapper shares, whatever the family: prompt routing by protocol (remembering
    the sample's ``index``), generation inside ``ivcp.prune``, per-sample statistics.

    A family wrapper provides ``authors_prompt_applies(dataset)``, ``authors_prompt(line, dataset)``,
    ``grounding_message(line, dataset)`` and ``model_inputs(message, dataset)``."""

    calls = 0  # generate() calls in this process (for tests of resuming)

    def _setup_run(self, name: str, method: str | None, method_params: dict, protocol: str, generation: dict) -> None:
        self.name, self.method, self.protocol = name, method, protocol
        self.method_params = dict(method_params or {})
        self.generate_kwargs = generate_kwargs(generation)
        self._index = None  # the sample whose prompt was built last
        self.last_prompt_text = None  # what the model received last (tests compare it with the oracle)
        if method is not None:  # bad names or parameters fail now, before any sample
            ivcp.resolve_method(self.model, method, **self.method_params)

    # VLMEvalKit asks use_custom_prompt before each sample; answering True routes every prompt through
    # build_prompt, which sees the row (its index) and applies the protocol.
    def use_custom_prompt(self, dataset: str) -> bool:
        return True

    def build_prompt(self, line, dataset: str):
        self._index = line["index"]
        if dataset in GROUNDING_SPLITS:
            return self.grounding_message(line, dataset)
        if self.protocol == "authors" and self.authors_prompt_applies(dataset):
            return self.authors_prompt(line, dataset)
        return self._dataset_object().build_prompt(line)

    def grounding_message(self, line, dataset: str):
        """Image(s), then the family's grounding prompt (it fixes the answer's box format)."""
        prompt = grounding_prompt(str(line["question"]), self.family)  # ValueError for a family without one
        paths = self.dump_image(line, dataset)
        paths = paths if isinstance(paths, list) else [paths]
        return [dict(type="image", value=p) for p in paths] + [dict(type="text", value=prompt)]

    def _dataset_object(self):
        owner = getattr(getattr(self, "dump_image_func", None), "__self__", None)
        if owner is None or not hasattr(owner, "build_prompt"):
            raise RuntimeError("the dataset's own prompt is needed but VLMEvalKit did not hand over the dataset "
                               "(set_dump_image with a dataset's dump_image)")
        return owner

    def generate_inner(self, message, dataset=None) -> str:
        type(self).calls += 1
        index, self._index = self._index, None
        inputs, prompt_length = self.model_inputs(message, dataset)
        context = contextlib.nullcontext(None) if self.method is None else \
            ivcp.prune(self.model, self.method, **self.method_params)
        with torch.inference_mode(), context as session:  # no autograd bookkeeping: ~8 % faster per picture, same answers
            out = self.model.generate(**inputs, **self.generate_kwargs)
        answer = self.decode(out[0, prompt_length:])
        record = session.last if session is not None else None
        n_visual = self.count_visual_tokens(inputs["input_ids"])
        if index is None:  # prompt not built through build_prompt: key the sample by its message
            index = "message:" + hashlib.sha1(json.dumps(message, sort_keys=True, default=str).encode()).hexdigest()[:16]
        stats.record(self.name, dataset or "none", index, {
            "n_visual": n_visual,
            "n_visual_kept": record.n_visual_kept if record is not None else n_visual,
            "visual_kv_share": record.visual_kv_share if record is not None else 1.0,
            "protocol": self.protocol})
        return answer


def _load_checkpoint(path: str, dtype: str = "bfloat16", **processor_kwargs):
    """(model, processor) of a real checkpoint: the entry's dtype on CUDA (flash-attn when installed),
    float32 sdpa on CPU; the processor with the checkpoint's own settings (+ ``processor_kwargs``)."""
    from .loading import load_model

    cuda = torch.cuda.is_available()
    return load_model(path, dtype=getattr(torch, dtype) if cuda else torch.float32, processor_kwargs=processor_kwargs)


class _QwenFamily:
    """What the Qwen-VL wrappers share: construction (VLMEvalKit's prompt mixin ``PROMPTS`` of the
    family, the fields its Qwen chat classes read, loading), the authors' prompts and reading the
    answer (mixed in before ``Qwen2VLChat`` / ``Qwen3VLChat``)."""

    INSTALL_REQ = False
    INTERLEAVE = True
    VIDEO_LLM = False
    PROMPTS: type  # the family's VLMEvalKit prompt mixin

    def __init__(self, model_path: str, name: str, family: str, method: str | None = None,
                 method_params: dict | None = None, protocol: str = "authors", min_pixels: int | None = None,
                 max_pixels: int | None = None, generation: dict | None = None, dtype: str = "bfloat16", **kwargs):
        from .loading import load_model

        self.PROMPTS.__init__(self, use_custom_prompt=True)  # BaseModel's init too; no checkpoint loading
        self.family, self.model_path = family, model_path
        self.min_pixels, self.max_pixels, self.total_pixels = min_pixels, max_pixels, None
        self.system_prompt, self.verbose, self.post_process = None, False, False  # no system prompt passed
        self.fps, self.nframe, self.FRAME_FACTOR = 2, 128, 2
        self.use_vllm = self.use_lmdeploy = False
        if model_path.startswith("tiny"):
            self.model, self.processor = load_model(model_path, pixels=(min_pixels, max_pixels))
        else:
            self.model, self.processor = _load_checkpoint(model_path, dtype)  # the processor's own defaults
        self._setup_run(name, method, method_params or {}, protocol, generation or {})

    def authors_prompt_applies(self, dataset: str) -> bool:
        return self.PROMPTS.use_custom_prompt(self, dataset)

    def authors_prompt(self, line, dataset: str):
        return self.PROMPTS.build_prompt(self, line, dataset)

    def _on_device(self, inputs, text) -> tuple[dict, int]:
        self.last_prompt_text = text[0] if isinstance(text, list) else text
        inputs = {k: v.to(self.model.device) if hasattr(v, "to") else v for k, v in dict(inputs).items()}
        return inputs, inputs["input_ids"].shape[1]

    def decode(self, tokens: torch.Tensor) -> str:
        return self.processor.batch_decode(tokens[None], skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]

    def count_visual_tokens(self, input_ids: torch.Tensor) -> int:
        config = self.model.config
        ids = torch.tensor([config.image_token_id, config.video_token_id], device=input_ids.device)
        return int(torch.isin(input_ids, ids).sum())


class IVCPQwenVL(_QwenFamily, IVCPModelMixin, Qwen2VLChat):
    """A Qwen2-VL / Qwen2.5-VL model run through ``ivcp.prune`` (or unpruned), with the authors' inputs.

    Subclasses VLMEvalKit's ``Qwen2VLChat`` for its prompt mixin and its message assembly
    (``_prepare_content``); loading and generation are ivcp's (any device, sdpa / flash-attn, the
    harness's generation settings, statistics). Runs on CPU when there is no GPU.
    """

    PROMPTS = Qwen2VLPromptMixin

    def model_inputs(self, message, dataset=None):
        """The authors' Qwen2VLChat input path: one user turn (no system prompt passed: the template
        adds its default), images resized by qwen_vl_utils within the entry's pixel bounds."""
        from qwen_vl_utils import process_vision_info

        messages = [{"role": "user", "content": self._prepare_content(message, dataset=dataset)}]
        text = self.processor.apply_chat_template([messages], tokenize=False, add_generation_prompt=True)
        images, videos = process_vision_info([messages])
        return self._on_device(self.processor(text=text, images=images, videos=videos, padding=True,
                                              return_tensors="pt"), text)


class IVCPQwen3VL(_QwenFamily, IVCPModelMixin, Qwen3VLChat):
    """A Qwen3-VL model (dense or MoE) run through ``ivcp.prune`` (or unpruned).

    The authors never ran Qwen3-VL: its ``authors`` protocol is VLMEvalKit's own ``Qwen3VLChat`` input
    path with its custom prompts (``Qwen3VLPromptMixin``: MCQ "Answer with the option letter only.",
    Y/N " Please answer yes or no.", VQA "…concisely with short words or phrases…"; VLMEvalKit's
    registered Qwen3-VL entries turn them off, which is our ``dataset`` protocol): no system prompt,
    images resized by ``qwen_vl_utils`` with 16-px patches (factor 32) within the entry's bounds, then
    the processor without resizing. Generation as every harness model (greedy, no repetition penalty).
    """

    PROMPTS = Qwen3VLPromptMixin

    def model_inputs(self, message, dataset=None):
        from qwen_vl_utils import process_vision_info

        messages = [{"role": "user", "content": self._prepare_content(message, dataset=dataset)}]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images, videos = process_vision_info(messages, image_patch_size=16)
        return self._on_device(self.processor(text=text, images=images, videos=videos, do_resize=False,
                                              return_tensors="pt"), text)


# The authors' (and VLMEvalKit's) Vicuna-v1 system prompt of their LLaVA wrapper; note the final space.
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions. ")


class IVCPLlava(IVCPModelMixin, LLaVA):
    """A LLaVA-1.5 model (native transformers ``LlavaForConditionalGeneration``, llava-hf weights) run
    through ``ivcp.prune`` (or unpruned), with the authors' inputs.

    Subclasses VLMEvalKit's ``LLaVA`` for its prompts (``use_custom_prompt``: MCQ; ``build_prompt``;
    ``concat_tilist``), which the authors' ``LLaVAIVCP`` keeps: the text is
    ``system + "USER: " + content + " ASSISTANT: "`` with each image as " <image> " (the Vicuna-v1
    layout of the original LLaVA, not llava-hf's chat template); the processor expands ``<image>`` to
    576 tokens and resizes + centre-crops to 336 px (PIL backend, as the authors' slow processor).
    The original ``llava`` package is never needed.
    """

    INSTALL_REQ = False
    INTERLEAVE = True

    def __init__(self, model_path: str, name: str, family: str = "llava", method: str | None = None,
                 method_params: dict | None = None, protocol: str = "authors", generation: dict | None = None,
                 dtype: str = "float16", **kwargs):
        from vlmeval.vlm.base import BaseModel

        from .loading import load_model

        BaseModel.__init__(self)  # not LLaVA.__init__: it imports the original llava package
        self.family, self.model_path = family, model_path
        self.system_prompt = VICUNA_SYSTEM
        if model_path.startswith("tiny"):
            self.model, self.processor = load_model(model_path)
        else:
            self.model, self.processor = _load_checkpoint(model_path, dtype, backend="pil")
        self._setup_run(name, method, method_params or {}, protocol, generation or {})

    def authors_prompt_applies(self, dataset: str) -> bool:
        return LLaVA.use_custom_prompt(self, dataset)

    def authors_prompt(self, line, dataset: str):
        return LLaVA.build_prompt(self, line, dataset)

    def model_inputs(self, message, dataset=None):
        from PIL import Image

        content, paths = self.concat_tilist(message)
        prompt = self.system_prompt + "USER: " + content + " ASSISTANT: "
        images = [Image.open(p).convert("RGB") for p in paths]
        inputs = self.processor(text=prompt, images=images or None, return_tensors="pt")
        self.last_prompt_text = prompt
        inputs = {k: v.to(self.model.device) if hasattr(v, "to") else v for k, v in dict(inputs).items()}
        return inputs, inputs["input_ids"].shape[1]

    def decode(self, tokens: torch.Tensor) -> str:
        return self.processor.batch_decode(tokens[None], skip_special_tokens=True)[0].strip()

    def count_visual_tokens(self, input_ids: torch.Tensor) -> int:
        return int((input_ids == self.model.config.image_token_id).sum())


# The InternVL2.5 / 3 chat template's system message (their ``internvl2_5`` template, which the remote
# code's chat() always adds and the native chat template does not).
INTERNVL_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


class IVCPInternVL(IVCPModelMixin, InternVLChat):
    """An InternVL 2.5 / 3 model on the native transformers class (``scripts/convert_internvl.py`` turns an
    InternVL2.5 remote-code checkpoint into it) run through ``ivcp.prune``, with the authors' inputs.

    Subclasses VLMEvalKit's ``InternVLChat`` for its prompts (``use_custom_prompt`` / ``build_prompt``,
    which the authors' ``InternVLChatIVCP`` keeps) and its tile budget per dataset (``set_max_num``: 6
    for every benchmark of the paper); the text is the remote code's chat(): the ``internvl2_5`` system
    message, one user turn with ``reorganize_prompt``'s ``<image>\n`` placement, each image expanded to
    ``<img>`` + 256 ``<IMG_CONTEXT>`` per tile + ``</img>`` by the processor (PIL tiling: pixel-identical
    to VLMEvalKit's ``load_image``); greedy, max_new_tokens 4096. The images' sizes go to the model so
    the tiles' layout is known (the authors' thumbnail mapping needs it). As the remote chat()
    (``modeling_internvl_chat.py``), generation stops at ``<|im_end|>`` and the reply is cut there.
    """

    STOP_TOKEN = "<|im_end|>"

    INSTALL_REQ = False
    INTERLEAVE = True

    def __init__(self, model_path: str, name: str, family: str = "internvl", method: str | None = None,
                 method_params: dict | None = None, protocol: str = "authors", generation: dict | None = None,
                 dtype: str = "bfloat16", **kwargs):
        from vlmeval.vlm.base import BaseModel

        from .loading import load_model

        BaseModel.__init__(self)  # not InternVLChat.__init__: it loads the remote code
        self.family, self.model_path, self.version = family, model_path, "V2.0"
        self._use_custom_prompt, self.use_mpo_prompt, self.use_cot, self.screen_parse = True, False, False, False
        self.system_prompt, self.kwargs, self.max_num, self.total_max_num = INTERNVL_SYSTEM, {}, 6, 64
        if model_path.startswith("tiny"):
            self.model, self.processor = load_model(model_path)
        else:
            self.model, self.processor = _load_checkpoint(model_path, dtype, backend="pil")
        self._setup_run(name, method, method_params or {}, protocol, generation or {})
        self.stop_token_id = self.processor.tokenizer.convert_tokens_to_ids(self.STOP_TOKEN)
        self.generate_kwargs["eos_token_id"] = self.stop_token_id  # the remote chat()'s eos_token_id

    def authors_prompt_applies(self, dataset: str) -> bool:
        return InternVLChat.use_custom_prompt(self, dataset)

    def authors_prompt(self, line, dataset: str):
        return InternVLChat.build_prompt(self, line, dataset)

    def model_inputs(self, message, dataset=None):
        from PIL import Image

        self.set_max_num(dataset)
        paths = [m["value"] for m in message if m["type"] == "image"]
        max_num = max(1, min(self.max_num, self.total_max_num // max(1, len(paths))))
        prompt = reorganize_prompt(message, len(paths), dataset=dataset)
        text = (f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
                "<|im_start|>assistant\n")
        self.last_prompt_text = text
        images = [Image.open(p).convert("RGB") for p in paths]
        inputs = dict(self.processor(text=text.replace("<image>", self.processor.image_token), images=images or None,
                                     max_patches=max_num, return_tensors="pt"))
        if images:
            inputs["image_sizes"] = torch.tensor([[image.height, image.width] for image in images])
        inputs = {k: v.to(self.model.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        return inputs, inputs["input_ids"].shape[1]

    def decode(self, tokens: torch.Tensor) -> str:
        """The reply up to the first ``<|im_end|>`` (then split on its text too, as chat() does)."""
        stops = (tokens == self.stop_token_id).nonzero()
        if stops.numel():
            tokens = tokens[: int(stops[0, 0])]
        text = self.processor.batch_decode(tokens[None], skip_special_tokens=True)[0]
        return text.split(self.STOP_TOKEN)[0].strip()

    def count_visual_tokens(self, input_ids: torch.Tensor) -> int:
        return int((input_ids == self.model.config.image_token_id).sum())


class IVCPDeepseekVL2(IVCPModelMixin, BaseModel):
    """DeepSeek-VL2 on ivcp's native class (``scripts/convert_deepseek_vl2.py`` converts a released checkpoint)
    run through ``ivcp.prune``, with the authors' inputs (their ``DeepSeekVL2IVCP``, as VLMEvalKit's ``DeepSeekVL2``):
    no custom prompt outside grounding (the datasets' own prompts); one user turn with ``<image>\n`` per image then
    the text, in the released ``deepseek`` chat format (``"<|User|>: " + content + "\n\n<|Assistant|>:"``, no system
    prompt); the released processor's tiling (none with more than two images); greedy, max_new_tokens 2048; the
    answer stripped of a final ".". Grounding: ``Locate <|ref|>…<|/ref|> in the given image.`` (MMMU's special
    prompt of their wrapper is not reproduced: MMMU is not one of the paper's benchmarks.)"""

    INSTALL_REQ = False
    INTERLEAVE = True

    def __init__(self, model_path: str, name: str, family: str = "deepseek_vl2", method: str | None = None,
                 method_params: dict | None = None, protocol: str = "authors", generation: dict | None = None,
                 dtype: str = "bfloat16", **kwargs):
        from .loading import load_model

        BaseModel.__init__(self)
        self.family, self.model_path = family, model_path
        if model_path.startswith("tiny"):
            self.model, self.processor = load_model(model_path)
        else:
            self.model, self.processor = _load_checkpoint(model_path, dtype)
        self._setup_run(name, method, method_params or {}, protocol, generation or {})

    def authors_prompt_applies(self, dataset: str) -> bool:
        return False  # the authors' wrapper customises grounding prompts only

    def authors_prompt(self, line, dataset: str):
        raise NotImplementedError("DeepSeek-VL2's authors' wrapper has no custom prompts outside grounding")

    def model_inputs(self, message, dataset=None):
        from PIL import Image

        from .models.deepseek_vl2_processor import chat_prompt

        content = "".join("<image>\n" if m["type"] == "image" else m["value"] for m in message)
        text = chat_prompt([{"role": "user", "content": content}], add_generation_prompt=True)
        self.last_prompt_text = text
        images = [Image.open(m["value"]).convert("RGB") for m in message if m["type"] == "image"]
        inputs = dict(self.processor(text=text, images=images or None, return_tensors="pt"))
        self._last_tiles = inputs.get("image_tiles")
        inputs = {k: v.to(self.model.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        return inputs, inputs["input_ids"].shape[1]

    def decode(self, tokens: torch.Tensor) -> str:
        return self.processor.decode(tokens, skip_special_tokens=True).strip().rstrip(".")

    def count_visual_tokens(self, input_ids: torch.Tensor) -> int:
        """Image positions without the newline / separator markup (which is never pruned)."""
        from .adapters import adapter_for

        adapter = adapter_for(self.model)
        return sum(s.n for s in adapter.segments(input_ids[0].cpu(), image_sizes=self._last_tiles))


FAMILY_WRAPPERS = {"qwen2_5_vl": IVCPQwenVL, "qwen2_vl": IVCPQwenVL, "qwen3_vl": IVCPQwen3VL, "llava": IVCPLlava,
                   "internvl": IVCPInternVL, "deepseek_vl2": IVCPDeepseekVL2}


def model_registry() -> dict:
    """Every model name ivcp adds to VLMEvalKit (each model × method suffix × prompt protocol), as
    factories (``functools.partial``) VLMEvalKit calls to build the model."""
    from functools import partial

    models = {}
    for name, run in all_run_names().items():
        entry = run.model
        models[name] = partial(FAMILY_WRAPPERS[entry.family], model_path=weights_for(entry.name, entry.hub_id),
                               name=name, family=entry.family, method=run.method, method_params=run.method_params,
                               protocol=run.protocol, min_pixels=entry.min_pixels, max_pixels=entry.max_pixels,
                               generation=entry.generation, dtype=entry.dtype)
    return models


# --- grounding datasets ---------------------------------------------------------------------------

class IVCPGrounding(ImageBaseDataset):
    """RefCOCO / RefCOCO+ / RefCOCOg splits read from ``$LMUData/<split>.tsv`` or from the upstream
    aggregated ``RefCOCO.tsv`` (split by its ``category`` / ``split`` column), in any of the three
    layouts (:func:`ivcp.eval.grounding.grounding_layout`), validated whole before any inference.
    Never downloads or deletes data."""

    TYPE = "GROUNDING"
    MODALITY = "IMAGE"

    def __init__(self, dataset: str = "RefCOCO_val", skip_noimg: bool = True):
        from .eval.rundata import lmudata_root

        try:
            lmudata_root()  # before VLMEvalKit's LMUDataRoot(), which would make ~/LMUData and read from it
        except ValueError as error:
            raise ValueError(f"{dataset}: {error}") from None
        super().__init__(dataset, skip_noimg)

    @classmethod
    def supported_datasets(cls):
        return list(GROUNDING_SPLITS)

    def load_data(self, dataset):
        from .eval.rundata import lmudata_root, sha256

        root = str(lmudata_root())  # never VLMEvalKit's silent fallback to ~/LMUData (checked in __init__)
        path = osp.join(root, f"{dataset}.tsv")
        aggregated = osp.join(root, "RefCOCO.tsv")
        if osp.exists(path):
            data, source = _read_tsv(path), path
        elif osp.exists(aggregated):
            data, source = _read_tsv(aggregated), aggregated
            labels = data["category"] if "category" in data else data["split"] if "split" in data else None
            if labels is None:
                raise ValueError(f"{aggregated}: an aggregated grounding TSV needs a `category` or `split` column "
                                 f"to find the rows of {dataset}")
            split = labels.astype(str).str.strip().str.replace(r"\s+", "_", regex=True)
            data = data[split == dataset].reset_index(drop=True)
            if data.empty:
                raise ValueError(f"{aggregated} holds no rows of {dataset}")
        else:
            raise FileNotFoundError(
                f"{dataset}: neither {path} nor {aggregated} exists. Put the TSVs in $LMUData, or make synthetic "
                f"ones in a folder of their own (`ivcp data make-grounding --out DIR`) and point LMUData at it.")
        self.layout = grounding_layout(data.columns, source)
        if data.empty:
            raise ValueError(f"{source}: no rows (only a header): nothing to evaluate")
        check_grounding_rows(data.to_dict("records"), self.layout, source)
        self.source = source
        # VLMEvalKit reuses a decoded picture found under img_root by index: key the folder by the data file,
        # so pictures of a replaced TSV are never taken for the new rows
        self.img_root = osp.join(root, "images", dataset, sha256(source)[:16])
        return data

    def build_prompt(self, line):
        """The dataset's own prompt: the authors' Qwen2.5-VL grounding text (ivcp's models replace it
        with their family's grounding prompt)."""
        if isinstance(line, int):
            line = self.data.iloc[line]
        paths = self.dump_image(line)
        paths = paths if isinstance(paths, list) else [paths]
        return [dict(type="image", value=p) for p in paths] + \
            [dict(type="text", value=grounding_prompt(str(line["question"])))]

    def evaluate(self, eval_file, **judge_kwargs):
        data = load(eval_file)
        model_name = _model_from_eval_file(eval_file, self.dataset_name)
        run = parse_run_name(model_name)
        family = run.model.family
        rows, unparsed, paper_hits, paper_failed = [], [], 0, 0
        for _, row in data.iterrows():
            row = row.to_dict()
            width, height = int(row["width"]), int(row["height"])
            truth = ground_truth(row, self.layout)
            text = "" if pd.isna(row["prediction"]) else str(row["prediction"])
            convention = FAMILY_CONVENTION[family]
            resized = None
            if convention == "resized_pixels":  # Qwen2.5-VL answers in the frame qwen_vl_utils resized to
                rh, rw = smart_resize(height, width, 28, run.model.min_pixels, run.model.max_pixels)
                resized = (rw, rh)
            parsed = parse_box(text, convention, (width, height), resized)
            rows.append({"split": self.dataset_name, "prediction": parsed, "gt": truth.box})
            predicted = paper_prediction(text, family)
            paper_failed += not any(predicted)
            paper_hits += paper_iou(predicted, truth.paper_box, width, height) >= 0.5
            if parsed.box is None:
                unparsed.append({"index": row["index"], "prediction": text[:200], "reason": parsed.reason})
        lenient = grounding_scores(rows)[self.dataset_name]
        share = stats.average_share(model_name, self.dataset_name, list(data["index"]))
        result = pd.DataFrame([{
            "split": self.dataset_name, "Acc@0.5": 100.0 * paper_hits / len(data), "Acc@0.5 lenient": lenient["acc"],
            "mIoU lenient": lenient["miou"], "n": len(data), "unparsed paper": paper_failed,
            "unparsed lenient": lenient["unparsed"], "avg_tokens": share, "layout": self.layout,
            "protocol": run.protocol}])
        stem = osp.splitext(eval_file)[0]
        dump(result, f"{stem}_acc.csv")
        if unparsed:
            dump(pd.DataFrame(unparsed), f"{stem}_unparsed.csv")
        return result


def _read_tsv(path: str) -> pd.DataFrame:
    """A TSV through VLMEvalKit's ``load``; an empty or unparsable file is a ValueError naming it."""
    if osp.getsize(path) == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes): not a TSV")
    try:
        return load(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable TSV ({str(error).splitlines()[0]})") from None


def _model_from_eval_file(eval_file: str, dataset: str) -> str:
    base = osp.basename(eval_file)
    match = re.match(rf"(.+)_{re.escape(dataset)}\.\w+$", base)
    if match is None:
        raise ValueError(f"cannot tell the model from the prediction file name {base!r}")
    return match.group(1)


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


__all__ = ["IVCPDeepseekVL2", "IVCPGrounding", "IVCPInternVL", "IVCPLlava", "IVCPModelMixin", "IVCPQwen3VL", "IVCPQwenVL", "MODELS", "model_registry", "register", "weights_for"]
