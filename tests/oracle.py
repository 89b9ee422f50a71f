"""An independent oracle for pruned decoding.

It runs the *unpruned* model without any cache over the prompt plus the tokens generated so far,
and replaces each decoder layer's attention mask by one that hides the dropped visual tokens:
from every query at layers ≥ K, and from the decode queries at layers < K too when the method cut
the earlier layers' cache (IVC-Prune) — at layers < K the prompt itself still sees everything.
No slicing, no cache trimming, positions computed by the model itself: if the engine's slicing,
trimming or positions were wrong, the logits would differ.
"""

from __future__ import annotations

import torch


def layer_masks(n_prompt: int, n_total: int, dropped: torch.Tensor, stages: list[int], num_layers: int,
                trims_earlier_layers: bool, dtype: torch.dtype, dropped_per_stage: list[torch.Tensor] | None = None):
    """One additive (1, 1, T, T) mask per layer.

    ``dropped`` (n_prompt,) bool: tokens gone after the last stage; ``dropped_per_stage`` lists, per
    stage, the tokens gone after that stage (defaults to ``dropped`` for one stage).
    """
    dropped_per_stage = dropped_per_stage or [dropped]
    q = torch.arange(n_total)[:, None]
    k = torch.arange(n_total)[None, :]
    causal = k <= q
    is_decode = q >= n_prompt
    masks = []
    for layer in range(num_layers):
        hidden_keys = torch.zeros(n_total, dtype=torch.bool)
        # keys gone for every query at this layer: dropped by a stage at or before it
        for stage, gone in zip(stages, dropped_per_stage):
            if layer >= stage:
                hidden_keys[:n_prompt] |= gone
        visible = causal & ~hidden_keys[None, :]
        if trims_earlier_layers:
            # decode queries see, at every layer, only what survived the last stage
            final = torch.zeros(n_total, dtype=torch.bool)
            final[:n_prompt] = dropped
            visible &= ~(is_decode & final[None, :])
        else:
            # FastV-style: a layer's cache holds what that layer processed in the prompt
            pass
        visible |= torch.eye(n_total, dtype=torch.bool)  # no empty rows for dropped queries
        mask = torch.zeros(n_total, n_total, dtype=dtype)
        mask.masked_fill_(~visible, torch.finfo(dtype).min)
        masks.append(mask[None, None])
    return masks


@torch.no_grad()
def oracle_logits(model, inputs: dict, generated: torch.Tensor, kept: torch.Tensor, stages: list[int],
                  trims_earlier_layers: bool, dropped_per_stage: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Logits (steps, vocab) for each generated step, from the masked no-cache oracle."""
    from ivcp.adapters import adapter_for

    adapter = adapter_for(model)
    n_prompt = inputs["input_ids"].shape[1]
    dropped = torch.ones(n_prompt, dtype=torch.bool)
    dropped[kept] = False
    steps = generated.shape[-1]
    full_ids = torch.cat([inputs["input_ids"], generated.view(1, -1)], dim=1)
    n_total = full_ids.shape[1]
    masks = layer_masks(n_prompt, n_total, dropped, stages, len(adapter.layers), trims_earlier_layers,
                        model.dtype, dropped_per_stage)
    handles = []
    for index, layer in enumerate(adapter.layers):
        def hook(module, args, kwargs, index=index):
            kwargs["attention_mask"] = masks[index]
            return args, kwargs
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        feed = dict(inputs)
        feed["input_ids"] = full_ids
        feed["attention_mask"] = torch.ones_like(full_ids)
        if "mm_token_type_ids" in feed:
            extra = torch.zeros(1, steps, dtype=feed["mm_token_type_ids"].dtype)
            feed["mm_token_type_ids"] = torch.cat([feed["mm_token_type_ids"], extra], dim=1)
        model.model.rope_deltas = None
        logits = model(**feed, use_cache=False).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    return logits[n_prompt - 1: n_prompt - 1 + steps]
