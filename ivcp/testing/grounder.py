"""The tiny grounder: a Qwen2.5-VL of about 1.1 M parameters trained to ground referring expressions on
``ivcp data make-grounding`` pictures (``scripts/train_tiny_grounder.py``), shipped in
``ivcp/checkpoints/tiny_grounder`` — the offline model whose accuracy pruning can change.

The helpers here give it exactly the harness's input (one user turn: the image, then the authors'
Qwen2.5-VL grounding prompt; the chat template's default system prompt) and score its answers.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from ..data.grounding import make_sample
from ..eval.grounding import grounding_prompt, iou, parse_box
from .qwen import tiny_config, tiny_processor

GROUNDER_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny_grounder"


def grounder_config(rope_theta: float = 10.0, head_dim: int = 32, num_hidden_layers: int = 4,
                    hidden_size: int = 128, **text_overrides: Any):
    """The tiny grounder's architecture (``scripts/train_tiny_grounder.py`` trains it): a Qwen2.5-VL of
    about 1.1 M parameters — decoder hidden ``hidden_size``, ``num_hidden_layers`` layers, heads of
    ``head_dim`` with grouped-query attention (2 query heads per KV head), M-RoPE sections in Qwen's
    proportions (1 : 1.5 : 1.5 of head_dim / 2); vision tower of hidden 64, 2 blocks (window attention
    of 56 px, then full attention), 2 x 2 merger."""
    heads = hidden_size // head_dim
    if heads * head_dim != hidden_size or heads < 2:
        raise ValueError(f"head_dim {head_dim} must divide hidden_size {hidden_size} into at least 2 heads")
    half = head_dim // 2
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text = dict(hidden_size=hidden_size, intermediate_size=3 * hidden_size, num_hidden_layers=num_hidden_layers,
                num_attention_heads=heads, num_key_value_heads=heads // 2,
                rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta), "mrope_section": section})
    text.update(text_overrides)
    vision = dict(depth=2, hidden_size=64, intermediate_size=256, num_heads=4, window_size=56, fullatt_block_indexes=[1])
    return tiny_config("qwen2_5_vl", vision_overrides=vision, **text)


def tiny_grounder(path: str | Path | None = None, dtype: torch.dtype = torch.float32,
                  attn_implementation: str = "sdpa"):
    """The shipped tiny grounder (trained, not random) and its processor: ``(model, processor)``.

    It answers the harness's grounding prompt on ``ivcp data make-grounding`` pictures with
    ``{"bbox_2d": [x1, y1, x2, y2]}``; ``ivcp/checkpoints/tiny_grounder/README.md`` says how it was
    made and how well it grounds. Fully offline."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    folder = Path(path) if path is not None else GROUNDER_DIR
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no tiny grounder checkpoint in {folder} (model.safetensors); train one with "
                                "scripts/train_tiny_grounder.py")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    model.eval()
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    model.generation_config.eos_token_id = model.config.text_config.eos_token_id
    return model, tiny_processor("qwen2_5_vl")


def prompt_text(processor, expression: str) -> str:
    """What the harness feeds the model: one user turn, the image, then the grounding prompt."""
    content = [{"type": "image"}, {"type": "text", "text": grounding_prompt(expression)}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@torch.no_grad()
def generate_answers(model, processor, images, expressions, batch_size: int = 50, max_new_tokens: int = 40) -> list[str]:
    """Batched greedy answers (left padding) of the unpruned model."""
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[str] = []
    try:
        for start in range(0, len(images), batch_size):
            texts = [prompt_text(processor, e) for e in expressions[start: start + batch_size]]
            inputs = processor(text=texts, images=images[start: start + batch_size], padding=True, return_tensors="pt")
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.0)
            out += processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def grounding_accuracy(model, processor, n: int, seed: int, batch_size: int = 50) -> tuple[float, float]:
    """(Acc@0.5 in percent, share of answers that parse) of the unpruned model on ``n`` fresh pictures
    drawn with ``seed``; greedy decoding, batched."""
    rng = random.Random(seed)
    samples = [make_sample(rng) for _ in range(n)]
    answers = generate_answers(model, processor, [s["image"] for s in samples], [s["expression"] for s in samples],
                               batch_size)
    hits = parsed = 0
    for sample, answer in zip(samples, answers):
        size = (sample["width"], sample["height"])
        box = parse_box(answer, "resized_pixels", size, size)
        parsed += box.box is not None
        hits += box.box is not None and iou(box.box, sample["box"]) >= 0.5
    return 100.0 * hits / n, parsed / n
