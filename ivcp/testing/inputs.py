"""Generated inputs for the tiny models: pictures and chat-formatted model inputs."""

from __future__ import annotations

import numpy as np
import torch


def make_image(width: int = 224, height: int = 168, seed: int = 0):
    """A deterministic RGB test picture: a colour gradient with a few filled shapes."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                     np.full_like(x, int(rng.integers(0, 256)))], axis=-1).astype(np.uint8)
    image = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height * 3 // 4))
        x1, y1 = x0 + int(rng.integers(width // 8, width // 3)), y0 + int(rng.integers(height // 8, height // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
    return image


def make_inputs(processor, prompt: str = "Describe the picture.", images=None, video_frames: int = 0,
                video_size: tuple[int, int] = (112, 84)) -> dict:
    """Chat-formatted model inputs for ``images`` (PIL images, in order) and/or one video.

    The video path needs no video processor: ``video_frames`` frames (a multiple of the temporal
    patch size, 2) of ``video_size`` are patchified as Qwen's video tower expects.
    """
    images = list(images or [])
    content: list[dict] = [{"type": "image"} for _ in images]
    if video_frames:
        content.append({"type": "video"})
    content.append({"type": "text", "text": prompt})
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    video: dict = {}
    if video_frames:
        if video_frames % 2:
            raise ValueError("video_frames must be a multiple of the temporal patch size (2)")
        frames = [make_image(*video_size, seed=100 + i) for i in range(video_frames)]
        pixel_values, grid = _patchify_video(processor.image_processor, frames)
        video = dict(pixel_values_videos=pixel_values, video_grid_thw=grid)
        merge = processor.image_processor.merge_size ** 2
        if any(c.__name__ == "Qwen3VLProcessor" for c in type(processor).__mro__):
            # Qwen3-VL's processor: each temporal slice "<t seconds>" + its own start/end markers
            t, h, w = (int(v) for v in grid[0])
            per_slice = "<|vision_start|>" + "<|video_pad|>" * (h * w // merge) + "<|vision_end|>"
            slices = "".join(f"<{i * 1.0:.1f} seconds>" + per_slice for i in range(t))
            text = text.replace("<|vision_start|><|video_pad|><|vision_end|>", slices, 1)
        else:
            text = text.replace("<|video_pad|>", "<|video_pad|>" * (int(grid.prod()) // merge), 1)
    if not video:
        return dict(processor(text=text, images=images or None, return_tensors="pt"))
    # A video made here: transformers' processors refuse video tokens without their own video input, so
    # the images are expanded and the text tokenized as the processor would (same ids and fields).
    data: dict = {}
    if images:
        vision = processor.image_processor(images=images, return_tensors="pt")
        data.update(pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])
        counts = iter([int(g.prod()) // merge for g in vision["image_grid_thw"]])
        pieces = text.split("<|image_pad|>")
        text = pieces[0] + "".join("<|image_pad|>" * next(counts) + piece for piece in pieces[1:])
    ids = processor.tokenizer(text, return_tensors="pt")
    data.update(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    types = torch.zeros_like(ids["input_ids"], dtype=torch.int32)
    types[ids["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")] = 1
    types[ids["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")] = 2
    data["mm_token_type_ids"] = types
    data.update(video)
    return data


def _patchify_video(image_processor, frames) -> tuple[torch.Tensor, torch.Tensor]:
    per_frame = image_processor(images=frames, return_tensors="pt")
    grids = per_frame["image_grid_thw"]
    if not bool((grids == grids[0]).all()):
        raise ValueError("all video frames must have the same size")
    t_patch = image_processor.temporal_patch_size
    _, h, w = (int(v) for v in grids[0])
    # Each frame was repeated temporal_patch_size times by the image processor; keep one copy of each
    # frame and pair consecutive frames into one temporal patch instead.
    channels, patch = 3, image_processor.patch_size
    x = per_frame["pixel_values"].view(len(frames), h * w, channels, t_patch, patch, patch)[:, :, :, 0]
    x = x.view(len(frames) // t_patch, t_patch, h * w, channels, patch, patch).permute(0, 2, 3, 1, 4, 5)
    x = x.reshape(len(frames) // t_patch * h * w, channels * t_patch * patch * patch)
    return x.contiguous(), torch.tensor([[len(frames) // t_patch, h, w]])



def make_batch_inputs(processor, rows: list[dict], padding_side: str = "left") -> dict:
    """One batch from several prompts: each row is :func:`make_inputs`' keyword arguments (``prompt``,
    ``images``, ``video_frames``…), the rows padded on ``padding_side`` ("left": what ``generate`` needs)
    with the tokenizer's pad token, their images and videos listed row by row — the layout the
    family's processor gives a batch, and every row's tokens exactly those of :func:`make_inputs`."""
    from ..batching import collate

    return collate([make_inputs(processor, **row) for row in rows], processor.tokenizer.pad_token_id, padding_side)
