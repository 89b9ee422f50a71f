"""The generated grounding prompts the vLLM parity, bench and server checks serve (several picture sizes;
every fifth prompt with a second picture before the first), and the token filter of the tiny models."""

from __future__ import annotations

import json
import random
from pathlib import Path

SIZES = [(224, 224), (280, 224), (224, 168), (336, 280), (168, 112)]


def prompts(n: int, seed: int) -> list[dict]:
    from ivcp.data.grounding import make_sample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        sample = make_sample(rng, canvas=SIZES[i % len(SIZES)])
        images = [sample["image"]]
        if i % 5 == 4:  # a second picture before the first: the expression is about the last one
            images.insert(0, make_sample(rng, canvas=SIZES[(i + 2) % len(SIZES)])["image"])
        out.append({**sample, "images": images})
    return out


def prompt_text(processor, expression: str, n_images: int) -> str:
    from ivcp.eval.grounding import grounding_prompt

    content = [{"type": "image"}] * n_images + [{"type": "text", "text": grounding_prompt(expression)}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def allowed_tokens(folder: Path) -> list[int] | None:
    """The tokens the checkpoint's generation config does not suppress (the tiny random models emit
    printable ASCII only, through ``suppress_tokens``, which HF's generate applies and vLLM does not)."""
    path = folder / "generation_config.json"
    suppressed = json.loads(path.read_text()).get("suppress_tokens") if path.is_file() else None
    if not suppressed:
        return None
    vocab = json.loads((folder / "config.json").read_text())
    size = (vocab.get("text_config") or vocab)["vocab_size"]
    return sorted(set(range(size)) - set(suppressed))


