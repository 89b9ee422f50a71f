"""Batches from per-sample model inputs.

``ivcp.prune`` takes any batch the family's processor makes. Where inputs were prepared one sample at a
time (a harness's wrappers, the benchmark's synthetic inputs), :func:`collate` stacks them the way the
processor would have: the sequences padded (on the left by default, as ``generate`` needs), the vision
inputs (pixels, grids, image sizes) listed sample after sample.
"""

from __future__ import annotations

import torch

SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def collate(samples: list[dict], pad_token_id: int, padding_side: str = "left") -> dict:
    """One batch from the inputs of single samples (each with a batch dimension of one). Sequence fields
    are padded to the longest (``input_ids`` with ``pad_token_id``, the others with 0; an
    ``attention_mask`` of ones is made for samples without one); every other tensor field is
    concatenated in sample order."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not samples:
        raise ValueError("collate needs at least one sample")
    for i, sample in enumerate(samples):
        ids = sample.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"sample {i}: input_ids must be a (1, length) tensor, got "
                             f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    samples = [dict(s, attention_mask=s.get("attention_mask", torch.ones_like(s["input_ids"]))) for s in samples]
    width = max(s["input_ids"].shape[1] for s in samples)
    keys = sorted({k for s in samples for k in s})
    batch: dict = {}
    for key in keys:
        if key in SEQUENCE_KEYS:
            missing = [i for i, s in enumerate(samples) if key not in s]
            if missing:
                raise ValueError(f"samples {missing} have no {key} while others do")
            fill = pad_token_id if key == "input_ids" else 0
            rows = []
            for s in samples:
                x = s[key]
                pad = torch.full((1, width - x.shape[1]), fill, dtype=x.dtype, device=x.device)
                rows.append(torch.cat([pad, x] if padding_side == "left" else [x, pad], dim=1))
            batch[key] = torch.cat(rows)
        else:
            present = [s[key] for s in samples if s.get(key) is not None]
            if present and all(isinstance(x, torch.Tensor) for x in present):
                batch[key] = torch.cat(present)
            elif present:
                raise ValueError(f"cannot collate the non-tensor field {key!r}")
    return batch
