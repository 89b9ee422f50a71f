"""An independent oracle for pruned decoding.

It runs the *unpruned* model without any cache over the prompt plus the tokens generated so far,
and replaces each decoder layer's attention mask by one that hides the dropped visual tokens:
- from every query at layers ≥ the stage that dropped them;
- when the method cuts the earlier layers' cache too (IVC-Prune), also from the decode queries at
  those layers (at layers < K the prompt itself still sees everything; a layer whose cache is not
  cut, e.g. layer 0 in the authors' LLaVA code, lets decode queries see them).
Options reproduce the other mechanics without slicing: replaced input embeddings (VScan's merge at
layer 0) and renumbered positions at layers ≥ a stage (PDrop's ``renumber``: the prompt closed up, the
decode tokens moved down as far).
No slicing, no cache trimming, positions computed by the model itself: if the engine's slicing,
trimming or positions were wrong, the logits would differ.
"""

from __future__ import annotations

import torch


def layer_masks(n_prompt: int, n_total: int, stages: list[tuple[int, torch.Tensor]], num_layers: int,
                trimmed_layers, dtype: torch.dtype) -> list[torch.Tensor]:
    """One additive (1, 1, T, T) mask per layer. ``stages``: (layer K, kept input indices after it);
    ``trimmed_layers``: the layers < K whose cache the method cuts (True: all, False: none)."""
    if isinstance(trimmed_layers, bool):
        trimmed_layers = range(num_layers) if trimmed_layers else ()
    trimmed_layers = set(trimmed_layers)
    q = torch.arange(n_total)[:, None]
    k = torch.arange(n_total)[None, :]
    causal = k <= q
    decode_rows = q >= n_prompt
    final_dropped = torch.zeros(n_total, dtype=torch.bool)
    if stages:  # no stages: nothing was dropped (a prompt without visual tokens)
        final_dropped[:n_prompt] = True
        final_dropped[stages[-1][1]] = False
    masks = []
    for layer in range(num_layers):
        hidden_keys = torch.zeros(n_total, dtype=torch.bool)
        for stage_layer, kept in stages:
            if layer >= stage_layer:
                gone = torch.ones(n_total, dtype=torch.bool)
                gone[kept] = False
                gone[n_prompt:] = False
                hidden_keys |= gone
        visible = causal & ~hidden_keys[None, :]
        if layer in trimmed_layers:
            visible &= ~(decode_rows & final_dropped[None, :])
        visible |= torch.eye(n_total, dtype=torch.bool)  # no empty rows for dropped queries
        mask = torch.zeros(n_total, n_total, dtype=dtype)
        mask.masked_fill_(~visible, torch.finfo(dtype).min)
        masks.append(mask[None, None])
    return masks


def renumbered_positions(position_ids: torch.Tensor, stages: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
    """PDrop's renumbering, stage by stage: each kept prompt token's ids move down by the number of
    tokens dropped before it. Returns, per stage, the (rows, n_prompt) ids the layers ≥ it use (only
    the kept tokens' columns are meaningful)."""
    current = position_ids.clone()
    alive = torch.arange(position_ids.shape[-1])
    out = []
    for _, kept in stages:
        keep = torch.isin(alive, kept)
        dropped_before = torch.cumsum(~keep, 0) - (~keep).long()
        updated = current.clone()
        updated[:, alive[keep]] = current[:, alive[keep]] - dropped_before[keep]
        current, alive = updated, alive[keep]
        out.append(current.clone())
    return out


@torch.no_grad()
def oracle_logits(model, inputs: dict, generated: torch.Tensor, stages: list[tuple[int, torch.Tensor]],
                  trimmed_layers, embedding_updates: dict[int, torch.Tensor] | None = None,
                  renumber: bool = False) -> torch.Tensor:
    """Logits (steps, vocab) for each generated step, from the masked no-cache oracle.

    ``stages``: (layer K, sorted kept input indices after that stage), in order;
    ``embedding_updates``: input index → replacement input embedding (applied before layer 0);
    ``renumber``: layers ≥ each stage see that stage's renumbered prompt positions, and the decode
    tokens' ids at those layers move down by the number of prompt tokens dropped so far (PDrop's rule).
    """
    from ivcp.adapters import adapter_for

    adapter = adapter_for(model)
    n_prompt = inputs["input_ids"].shape[1]
    steps = generated.shape[-1]
    full_ids = torch.cat([inputs["input_ids"], generated.view(1, -1)], dim=1)
    n_total = full_ids.shape[1]
    masks = layer_masks(n_prompt, n_total, stages, len(adapter.layers), trimmed_layers, model.dtype)
    captured: dict = {}

    def on_text_model(module, args, kwargs):
        pos = kwargs.get("position_ids")
        if pos is None:  # 1-D RoPE models number the tokens themselves
            pos = torch.arange(n_total)[None]
        if pos.dim() == 2:
            pos = pos[None]
        captured["positions"] = pos[1:] if pos.shape[0] == 4 else pos

    handles = [adapter.text_model.register_forward_pre_hook(on_text_model, with_kwargs=True)]
    for index, layer in enumerate(adapter.layers):
        def hook(module, args, kwargs, index=index):
            kwargs["attention_mask"] = masks[index]
            if index == 0 and embedding_updates:
                hidden = args[0].clone()
                for token, value in embedding_updates.items():
                    hidden[0, token] = value.to(hidden.dtype)
                args = (hidden,) + tuple(args[1:])
            if renumber:
                rotary = adapter.split_position_embeddings(kwargs["position_embeddings"])
                for (stage_layer, kept), prompt_ids in zip(stages, captured["renumbered"]):
                    if index >= stage_layer:
                        ids = captured["positions"].clone()
                        ids[:, 0, :n_prompt] = prompt_ids
                        ids[:, 0, n_prompt:] -= n_prompt - kept.numel()  # decode tokens follow the closed gaps
                        rotary = adapter.rotary_embedding(args[0], ids)
                kwargs["position_embeddings"] = adapter.join_position_embeddings(rotary)
            return args, kwargs
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        feed = dict(inputs)
        feed["input_ids"] = full_ids
        feed["attention_mask"] = torch.ones_like(full_ids)
        if "mm_token_type_ids" in feed:  # the tokens after those it covers are text
            extra = torch.zeros(1, n_total - feed["mm_token_type_ids"].shape[1], dtype=feed["mm_token_type_ids"].dtype)
            feed["mm_token_type_ids"] = torch.cat([feed["mm_token_type_ids"], extra], dim=1)
        if renumber:
            if hasattr(model.model, "get_rope_index"):  # M-RoPE
                pos, _ = model.model.get_rope_index(**_rope_args(model, feed))
            else:
                pos = torch.arange(n_total)[None, None]
            captured["renumbered"] = renumbered_positions(pos[:, 0, :n_prompt], stages)
        if hasattr(model.model, "rope_deltas"):
            model.model.rope_deltas = None
        logits = model(**feed, use_cache=False).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    return logits[n_prompt - 1: n_prompt - 1 + steps]


def _rope_args(model, feed: dict) -> dict:
    import inspect

    names = inspect.signature(model.model.get_rope_index).parameters
    return {k: v for k, v in feed.items() if k in names}


def record_stages(record) -> list[tuple[int, torch.Tensor]]:
    """(layer, kept) per stage from an engine record — the *selection*, which the oracle takes as given."""
    return [(stage["layer"], stage["kept"]) for stage in record.stages]


def trimmed_layers(session) -> set[int]:
    """The layers whose cache the session's method cut, at its last selection."""
    stages = session.last.stages
    return set(session.method.trimmed_layers(stages[-1]["layer"])) if stages else set()


def vscan_embedding_updates(model, inputs, record) -> dict[int, torch.Tensor]:
    """Merged embeddings the encoder stage should hand the LLM, computed from the tower's features."""
    from ivcp.methods.vscan import merge_into_kept

    features = {}

    def grab(module, args, kwargs):
        features.setdefault("h", args[0].clone())

    from ivcp.adapters import adapter_for

    handle = adapter_for(model).layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    kept_after_encoder = record.stages[0]["kept"]
    updates = {}
    for (start, end), strided in zip(record.segments, record.strides or [None] * len(record.segments)):
        tokens = torch.arange(start, end)
        if strided is not None:  # (grid_w, row_stride): rows of grid_w tokens, row_stride apart (DeepSeek-VL2's tiles)
            grid_w, stride = strided
            tokens = tokens[(tokens - start) % stride < grid_w]
        local = torch.searchsorted(tokens, kept_after_encoder[torch.isin(kept_after_encoder, tokens)])
        merged = merge_into_kept(features["h"][0, tokens].float(), local)
        updates.update({int(tokens[j]): merged[i].float() for i, j in enumerate(local)})
    return updates
