"""DeepSeek-VL2's processor, PIL only: tiling, the image tokens with their newline / separator positions and
the chat format of the released checkpoints (their ``deepseek`` conversation template). A transformers
``ProcessorMixin`` (:class:`DeepseekVL2Processor`) around a ``BaseImageProcessor`` (:class:`DeepseekVL2ImageProcessor`)
and the tokenizer; importing this module registers both with ``AutoProcessor`` / ``AutoImageProcessor`` (under
:class:`~ivcp.models.deepseek_vl2.DeepseekVL2Config`), so a folder they were saved to loads with
``AutoProcessor.from_pretrained`` (no remote code).

Per image (as the released processor does): the global view is the image padded (``ImageOps.pad``: resized to
fit, centred, background = the normalisation mean, 127) to one tile; the local view is the image padded the
same way to the chosen canvas (:func:`select_resolution`; no tiling when a prompt has more than
``max_tiled_images`` images) and cut into tiles row-major; pixels are scaled to [0, 1] and normalised with
mean = std = 0.5. The prompt starts with the tokenizer's begin-of-sentence token; each ``<image>`` becomes
:meth:`DeepseekVL2Config.image_token_count` image tokens.

Chat format: ``"<|User|>: " + content + "\\n\\n<|Assistant|>:"`` with no system prompt, images written as
``<image>\\n`` before the text (VLMEvalKit's wrapper); an answered turn ends with the end-of-sentence token.
:data:`CHAT_TEMPLATE` is the same format in Jinja (the processor's ``chat_template``).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from transformers import BaseImageProcessor, BatchFeature, ProcessorMixin

from .deepseek_vl2 import DeepseekVL2Config, select_resolution
from .internvl_processor import flat_images, split_kwargs

IMAGE_TOKEN = "<image>"
GROUNDING_TOKENS = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")
CHAT_TOKENS = ("<|User|>", "<|Assistant|>")
LEGACY_PROCESSOR_FILE = "ivcp_processor_config.json"  # what converted folders held before the ProcessorMixin

# chat_prompt in Jinja: the content stripped, each turn "role: content" then "\n\n" (user) or the end-of-sentence
# token (assistant), an empty turn "role:", the whole stripped.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(out='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set role = '<|User|>' -%}"
    "{%- elif message['role'] == 'assistant' -%}{%- set role = '<|Assistant|>' -%}"
    "{%- else -%}{{ raise_exception(\"DeepSeek-VL2's chat format has user and assistant turns, not '\" + "
    "message['role'] + \"'\") }}{%- endif -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set parts = namespace(text='') -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set parts.text = parts.text + '<image>\\n' -%}"
    "{%- else -%}{%- set parts.text = parts.text + part.get('text', '') -%}{%- endif -%}"
    "{%- endfor -%}{%- set content = parts.text -%}{%- endif -%}"
    "{%- set content = content | trim -%}"
    "{%- if content -%}{%- set ns.out = ns.out + role + ': ' + content + ('\\n\\n' if role == '<|User|>' else eos_token) -%}"
    "{%- else -%}{%- set ns.out = ns.out + role + ':' -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{%- set ns.out = ns.out + '<|Assistant|>:' -%}{%- endif -%}"
    "{{ ns.out | trim }}"
)


def chat_prompt(messages: list[dict], add_generation_prompt: bool = True, eos_token: str = "<｜end▁of▁sentence｜>") -> str:
    """The ``deepseek`` template of the released processor: ``role + ": " + content`` per turn, user turns
    followed by "\\n\\n", assistant turns by the end-of-sentence token; contents stripped; the whole stripped.
    A content list writes each image as ``<image>\\n`` and then its text parts."""
    out = ""
    for message in messages:
        role = {"user": "<|User|>", "assistant": "<|Assistant|>"}.get(message["role"])
        if role is None:
            raise ValueError(f"DeepSeek-VL2's chat format has user and assistant turns, not {message['role']!r}")
        content = message["content"]
        if not isinstance(content, str):
            content = "".join(IMAGE_TOKEN + "\n" if part["type"] == "image" else part.get("text", "")
                              for part in content)
        content = content.strip()
        out += role + ": " + content + ("\n\n" if role == "<|User|>" else eos_token) if content else role + ":"
    if add_generation_prompt:
        out += "<|Assistant|>:"
    return out.strip()


class DeepseekVL2ImageProcessor(BaseImageProcessor):
    """The released tiling, PIL / numpy only: per image the global view (the image padded to one tile) then the local
    tiles (row-major) of the chosen canvas; ``tiled=False`` (more than ``max_tiled_images`` images in a prompt) gives
    one local tile. Returns ``pixel_values`` (tiles, 3, S, S) and ``image_tiles`` (images, 2: rows, cols)."""

    model_input_names = ["pixel_values", "image_tiles"]

    def __init__(self, tile_size: int = 384, candidate_resolutions=None, image_mean=(0.5, 0.5, 0.5),
                 image_std=(0.5, 0.5, 0.5), **kwargs):
        from .deepseek_vl2 import candidate_resolutions as released

        super().__init__(**kwargs)
        self.tile_size = int(tile_size)
        self.candidate_resolutions = [list(map(int, r)) for r in (candidate_resolutions or released(self.tile_size))]
        self.image_mean, self.image_std = [float(v) for v in image_mean], [float(v) for v in image_std]

    def tile_grid(self, width: int, height: int, tiled: bool = True) -> tuple[int, int]:
        """(rows, cols) of local tiles for an image of ``width`` × ``height``."""
        if not tiled:
            return 1, 1
        best_w, best_h = select_resolution(width, height, self.candidate_resolutions)
        return best_h // self.tile_size, best_w // self.tile_size

    def _to_tensor(self, image) -> torch.Tensor:
        array = np.asarray(image, dtype=np.float32) / 255.0
        mean, std = np.array(self.image_mean, np.float32), np.array(self.image_std, np.float32)
        return torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy())

    def image_tiles(self, image, tiled: bool = True) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """The global view then the local tiles (row-major) of one PIL image, and its (rows, cols)."""
        from PIL import ImageOps

        image = image.convert("RGB")
        background = tuple(int(m * 255) for m in self.image_mean)
        rows, cols = self.tile_grid(image.width, image.height, tiled)
        size = self.tile_size
        tiles = [self._to_tensor(ImageOps.pad(image, (size, size), color=background))]
        local = ImageOps.pad(image, (cols * size, rows * size), color=background)
        for top in range(0, rows * size, size):
            for left in range(0, cols * size, size):
                tiles.append(self._to_tensor(local.crop((left, top, left + size, top + size))))
        return tiles, (rows, cols)

    def preprocess(self, images, tiled: bool = True, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        if kwargs:
            raise TypeError(f"DeepseekVL2ImageProcessor got unexpected keyword arguments {', '.join(sorted(kwargs))}")
        images = flat_images(images)
        if not images:
            raise ValueError("DeepseekVL2ImageProcessor needs at least one image")
        tiles, layouts = [], []
        for image in images:
            more, layout = self.image_tiles(image, tiled)
            tiles += more
            layouts.append(list(layout))
        return BatchFeature({"pixel_values": torch.stack(tiles), "image_tiles": torch.tensor(layouts)},
                            tensor_type=return_tensors)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)


class DeepseekVL2Processor(ProcessorMixin):
    """Text + images → ``input_ids``, ``attention_mask``, ``pixel_values`` (tiles, 3, S, S; per image the global
    view then the local tiles), ``image_tiles`` (images, 2: rows, cols of local tiles) and ``image_sizes``
    (images, 2: height, width of the originals). Each prompt starts with the begin-of-sentence token (unless
    ``add_special_tokens=False``); rows are padded on ``padding_side`` (left by default)."""

    def __init__(self, image_processor=None, tokenizer=None, patch_size: int = 14, downsample_ratio: int = 2,
                 max_tiled_images: int = 2, chat_template: str | None = CHAT_TEMPLATE, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.patch_size, self.downsample_ratio = int(patch_size), int(downsample_ratio)
        self.max_tiled_images = int(max_tiled_images)
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token")

    @classmethod
    def from_settings(cls, tokenizer, tile_size: int = 384, patch_size: int = 14, downsample_ratio: int = 2,
                      candidate_resolutions=None, max_tiled_images: int = 2, image_mean=(0.5, 0.5, 0.5),
                      image_std=(0.5, 0.5, 0.5)) -> "DeepseekVL2Processor":
        """The processor of these settings (the released ``processor_config.json``'s names)."""
        image_processor = DeepseekVL2ImageProcessor(tile_size, candidate_resolutions, image_mean, image_std)
        return cls(image_processor, tokenizer, patch_size=patch_size, downsample_ratio=downsample_ratio,
                   max_tiled_images=max_tiled_images)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "DeepseekVL2Processor":
        """From a folder written by ``save_pretrained`` (or by ``scripts/convert_deepseek_vl2.py``); a folder converted
        before the processor was a ``ProcessorMixin`` (``ivcp_processor_config.json``) loads too."""
        directory = str(pretrained_model_name_or_path)
        legacy = os.path.join(directory, LEGACY_PROCESSOR_FILE)
        if not os.path.isfile(os.path.join(directory, "processor_config.json")) and os.path.isfile(legacy):
            from transformers import AutoTokenizer

            with open(legacy) as f:
                settings = json.load(f)
            settings.update(kwargs)
            return cls.from_settings(AutoTokenizer.from_pretrained(directory), **settings)
        if os.path.isdir(directory) and not os.path.isfile(os.path.join(directory, "processor_config.json")):
            raise FileNotFoundError(f"{directory}: no processor_config.json (not a DeepSeek-VL2 folder converted by "
                                    "scripts/convert_deepseek_vl2.py)")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # --- settings ---------------------------------------------------------------------------
    @property
    def tile_size(self) -> int:
        return self.image_processor.tile_size

    @property
    def tokens_per_side(self) -> int:
        return math.ceil((self.tile_size // self.patch_size) / self.downsample_ratio)

    def image_token_count(self, rows: int, cols: int) -> int:
        side = self.tokens_per_side
        return side * (side + 1) + 1 + rows * side * (cols * side + 1)

    def tile_grid(self, width: int, height: int, tiled: bool = True) -> tuple[int, int]:
        """(rows, cols) of local tiles for an image of ``width`` × ``height``."""
        return self.image_processor.tile_grid(width, height, tiled)

    # --- text -------------------------------------------------------------------------------
    def apply_chat_template(self, conversation, chat_template: str | None = None, add_generation_prompt: bool | None = None,
                            **kwargs):
        """``ProcessorMixin.apply_chat_template``, ending in ``<|Assistant|>:`` by default (as the released wrapper's
        prompts do), unless ``continue_final_message``."""
        if add_generation_prompt is None:
            add_generation_prompt = not kwargs.get("continue_final_message")
        return super().apply_chat_template(conversation, chat_template, add_generation_prompt=add_generation_prompt,
                                           **kwargs)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def __call__(self, images=None, text=None, videos=None, audio=None, return_tensors: str | None = "pt",
                 **kwargs) -> BatchFeature:
        if text is None:
            raise ValueError("DeepseekVL2Processor needs text: the prompt(s), one <image> per image")
        if videos is not None or audio is not None:
            raise ValueError("DeepseekVL2Processor processes images only (no videos, no audio)")
        text_kwargs, _ = split_kwargs(kwargs, type(self).__name__, ())
        unsupported = sorted(k for k in text_kwargs if k not in ("padding", "padding_side", "add_special_tokens"))
        if unsupported:
            raise TypeError(f"DeepseekVL2Processor does not support {', '.join(unsupported)}")
        if text_kwargs.get("padding") not in (None, True, False, "longest"):
            raise ValueError(f"DeepseekVL2Processor pads to the longest prompt, not padding={text_kwargs['padding']!r}")
        padding_side = text_kwargs.get("padding_side", "left")
        texts = [text] if isinstance(text, str) else list(text)
        images = flat_images(images)
        if sum(t.count(IMAGE_TOKEN) for t in texts) != len(images):
            raise ValueError(f"the prompts hold {sum(t.count(IMAGE_TOKEN) for t in texts)} {IMAGE_TOKEN} but "
                             f"{len(images)} images were given")
        bos = self.tokenizer.bos_token_id if text_kwargs.get("add_special_tokens", True) else None
        rows, pixel_values, layouts, sizes = [], [], [], []
        cursor = 0
        for t in texts:
            pieces = t.split(IMAGE_TOKEN)
            count = len(pieces) - 1
            ids = ([bos] if bos is not None else []) + self._encode(pieces[0])
            if count:
                vision = self.image_processor(images[cursor: cursor + count], tiled=count <= self.max_tiled_images,
                                              return_tensors="pt")
                pixel_values.append(vision["pixel_values"])
                layouts += vision["image_tiles"].tolist()
                sizes += [[image.height, image.width] for image in images[cursor: cursor + count]]
                for piece, (r, c) in zip(pieces[1:], vision["image_tiles"].tolist()):
                    ids += [self.image_token_id] * self.image_token_count(r, c) + self._encode(piece)
                cursor += count
            rows.append(ids)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad if pad is not None else 0, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            span = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
            input_ids[i, span], attention_mask[i, span] = torch.tensor(ids, dtype=torch.long), 1
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if images:
            data.update(pixel_values=torch.cat(pixel_values), image_tiles=torch.tensor(layouts),
                        image_sizes=torch.tensor(sizes))
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_tiles", "image_sizes"]


def _register() -> None:
    """``AutoProcessor`` / ``AutoImageProcessor`` know DeepSeek-VL2 (by its config class, and by the class names a
    saved folder gives). ``AutoImageProcessor`` comes from its module: before 5.2x, without torchvision, the name
    ``transformers.AutoImageProcessor`` is a placeholder that needs torchvision, the class itself is not."""
    from transformers import AutoProcessor
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    AutoImageProcessor.register(DeepseekVL2Config, image_processor_classes={"pil": DeepseekVL2ImageProcessor},
                                exist_ok=True)
    AutoProcessor.register(DeepseekVL2Config, DeepseekVL2Processor, exist_ok=True)


_register()
