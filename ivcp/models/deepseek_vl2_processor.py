"""DeepSeek-VL2's processor, PIL only: tiling, the image tokens with their newline / separator positions and
the chat format of the released checkpoints (their ``deepseek`` conversation template).

Per image (as the released processor does): the global view is the image padded (``ImageOps.pad``: resized to
fit, centred, background = the normalisation mean, 127) to one tile; the local view is the image padded the
same way to the chosen canvas (:func:`select_resolution`; no tiling when a prompt has more than
``max_tiled_images`` images) and cut into tiles row-major; pixels are scaled to [0, 1] and normalised with
mean = std = 0.5. The prompt starts with the tokenizer's begin-of-sentence token; each ``<image>`` becomes
:meth:`DeepseekVL2Config.image_token_count` image tokens.

Chat format: ``"<|User|>: " + content + "\\n\\n<|Assistant|>:"`` with no system prompt, images written as
``<image>\\n`` before the text (VLMEvalKit's wrapper); an answered turn ends with the end-of-sentence token.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch

from .deepseek_vl2 import select_resolution

IMAGE_TOKEN = "<image>"
GROUNDING_TOKENS = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")
CHAT_TOKENS = ("<|User|>", "<|Assistant|>")
PROCESSOR_FILE = "ivcp_processor_config.json"


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


class DeepseekVL2Processor:
    """Text + images → ``input_ids``, ``attention_mask``, ``pixel_values`` (tiles, 3, S, S; per image the global
    view then the local tiles), ``image_tiles`` (images, 2: rows, cols of local tiles) and ``image_sizes``
    (images, 2: height, width of the originals)."""

    image_token = IMAGE_TOKEN

    def __init__(self, tokenizer, tile_size: int = 384, patch_size: int = 14, downsample_ratio: int = 2,
                 candidate_resolutions=None, max_tiled_images: int = 2, image_mean=(0.5, 0.5, 0.5),
                 image_std=(0.5, 0.5, 0.5)):
        from .deepseek_vl2 import candidate_resolutions as released

        self.tokenizer = tokenizer
        self.tile_size, self.patch_size, self.downsample_ratio = int(tile_size), int(patch_size), int(downsample_ratio)
        self.candidate_resolutions = [list(map(int, r)) for r in (candidate_resolutions or released(tile_size))]
        self.max_tiled_images = int(max_tiled_images)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token")
        self.chat_template = None

    # --- settings ---------------------------------------------------------------------------
    @property
    def tokens_per_side(self) -> int:
        return math.ceil((self.tile_size // self.patch_size) / self.downsample_ratio)

    def image_token_count(self, rows: int, cols: int) -> int:
        side = self.tokens_per_side
        return side * (side + 1) + 1 + rows * side * (cols * side + 1)

    def tile_grid(self, width: int, height: int, tiled: bool = True) -> tuple[int, int]:
        """(rows, cols) of local tiles for an image of ``width`` × ``height``."""
        if not tiled:
            return 1, 1
        best_w, best_h = select_resolution(width, height, self.candidate_resolutions)
        return best_h // self.tile_size, best_w // self.tile_size

    def save_pretrained(self, directory: str) -> None:
        self.tokenizer.save_pretrained(directory)
        settings = dict(tile_size=self.tile_size, patch_size=self.patch_size, downsample_ratio=self.downsample_ratio,
                        candidate_resolutions=self.candidate_resolutions, max_tiled_images=self.max_tiled_images,
                        image_mean=list(self.image_mean), image_std=list(self.image_std))
        with open(os.path.join(directory, PROCESSOR_FILE), "w") as f:
            json.dump(settings, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str, **kwargs) -> "DeepseekVL2Processor":
        """From a folder written by :meth:`save_pretrained` (or by ``scripts/convert_deepseek_vl2.py``)."""
        from transformers import AutoTokenizer

        path = os.path.join(directory, PROCESSOR_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: not a DeepSeek-VL2 folder converted by scripts/convert_deepseek_vl2.py")
        with open(path) as f:
            settings = json.load(f)
        settings.update(kwargs)
        return cls(AutoTokenizer.from_pretrained(directory), **settings)

    # --- images -----------------------------------------------------------------------------
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

    # --- text -------------------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kwargs) -> str:
        if tokenize:
            raise ValueError("apply_chat_template only renders text here; call the processor on it")
        return chat_prompt(messages, add_generation_prompt, self.tokenizer.eos_token or "<｜end▁of▁sentence｜>")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def __call__(self, text, images=None, return_tensors: str = "pt", padding_side: str = "left", **kwargs) -> dict:
        texts = [text] if isinstance(text, str) else list(text)
        images = list(images or [])
        if sum(t.count(IMAGE_TOKEN) for t in texts) != len(images):
            raise ValueError(f"the prompts hold {sum(t.count(IMAGE_TOKEN) for t in texts)} {IMAGE_TOKEN} but "
                             f"{len(images)} images were given")
        bos = self.tokenizer.bos_token_id
        rows, pixel_values, layouts, sizes = [], [], [], []
        cursor = 0
        for t in texts:
            pieces = t.split(IMAGE_TOKEN)
            tiled = len(pieces) - 1 <= self.max_tiled_images
            ids = ([bos] if bos is not None else []) + self._encode(pieces[0])
            for piece in pieces[1:]:
                image = images[cursor]
                cursor += 1
                tiles, (r, c) = self.image_tiles(image, tiled)
                pixel_values += tiles
                layouts.append([r, c])
                sizes.append([image.height, image.width])
                ids += [self.image_token_id] * self.image_token_count(r, c) + self._encode(piece)
            rows.append(ids)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad if pad is not None else 0, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            span = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
            input_ids[i, span], attention_mask[i, span] = torch.tensor(ids), 1
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if images:
            data.update(pixel_values=torch.stack(pixel_values), image_tiles=torch.tensor(layouts),
                        image_sizes=torch.tensor(sizes))
        return data

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, sequence, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(sequence, skip_special_tokens=skip_special_tokens, **kwargs)
