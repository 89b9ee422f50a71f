"""Qwen2.5-VL served by vLLM with a visual-token pruning method applied inside the LLM, exactly.

How one prompt's prefill runs (design and reasons: docs/vllm.md):

1. the processor gives each image ``n_kept`` placeholder tokens (known from its grid:
   :func:`ivcp.vllm.method.kept_visual_count`), so the scheduler reserves KV slots for the pruned
   prompt only; the M-RoPE positions of the text are the unpruned model's, the decode delta follows;
2. ``embed_multimodal`` runs the vision tower, keeps each image's full embeddings in a side store and
   hands vLLM ``n_kept`` tagged placeholder rows;
3. ``forward`` finds the requests whose whole prompt is in this step with tagged rows, rebuilds each
   full prompt (text embeddings + full image embeddings + original positions), runs layers < K over it
   on a side path, asks the method (unchanged, through a :class:`~ivcp.selection.SelectionContext`) which
   visual tokens to keep, then runs the batch through vLLM's layers: in layers < K the request's rows
   write the side path's keys / values of the kept tokens into their paged-KV slots (vLLM's own
   attention call) and take the side path's hidden states; layers ≥ K run as usual on the kept tokens
   with their original positions;
4. decoding is plain vLLM.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from vllm.forward_context import get_forward_context
from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder,
                                                   Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from ..adapters import adapter_for
from ..selection import SelectionContext
from .method import kept_visual_count, resolve

ARCHITECTURE = "IvcpQwen2_5_VLForConditionalGeneration"
TAG = 77.0  # channel 0 of a placeholder row: the row stands for a stored image
_BASE = 200  # the store key in channels 1..3, base 200 (exact in any float dtype down to bf16)
_STORE_SIZE = 512


def method_of(hf_config):
    """The method the model was loaded with (``hf_overrides={"ivcp_method": ..., "ivcp_params": {...}}``), or None."""
    name = getattr(hf_config, "ivcp_method", None)
    if name in (None, "", "vanilla"):
        return None
    text = hf_config.get_text_config()
    return resolve(hf_config.model_type, text.num_hidden_layers, text.hidden_size, name,
                   dict(getattr(hf_config, "ivcp_params", None) or {}))


class IvcpQwen2_5_VLProcessor(Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's processor with each image's placeholder count cut to what the method keeps."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        method = method_of(self.info.get_hf_config())
        if method is None:
            return updates
        merge = self.info.get_image_processor(**hf_processor_mm_kwargs).merge_size
        image_token = self.info.get_hf_config().image_token_id

        def replacement(item_idx: int):
            _, h, w = (int(x) for x in out_mm_kwargs["image"][item_idx]["image_grid_thw"].data)
            return [image_token] * kept_visual_count(method, h // merge, w // merge)

        out = []
        for update in updates:
            if update.modality == "video":
                out.append(update)  # videos are refused by the model (embed_multimodal)
            else:
                out.append(PromptReplacement(modality="image", target=update.target, replacement=replacement))
        return out


@MULTIMODAL_REGISTRY.register_processor(IvcpQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class IvcpQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with ivcp's pruning inside the LLM; with no method configured it is vLLM's model."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.ivcp_method = method_of(self.config)
        self._store: OrderedDict[int, tuple[torch.Tensor, int, int]] = OrderedDict()
        self._next_key = 1
        self._batch_ids: torch.Tensor | None = None
        self._record_path = os.environ.get("IVCP_VLLM_RECORD")
        if self.ivcp_method is None:
            return
        check_engine(vllm_config)
        self._adapter = adapter_for(SimpleNamespace(config=self.config))
        self._layer = self.ivcp_method.selection_layers()[0]

    # --- step 1: kept-count layout of positions ----------------------------------------------------
    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self.ivcp_method is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        pieces, st, top = [], 0, -1
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality != "image":
                raise ValueError("ivcp's vLLM plugin prunes images only; this prompt has a video")
            offset, length = feature.mm_position.offset, feature.mm_position.length
            _, h, w = feature.data["image_grid_thw"].data.tolist()
            merge = self.config.vision_config.spatial_merge_size
            gh, gw = h // merge, w // merge
            text = torch.arange(offset - st) + top + 1
            pieces.append(text.expand(3, -1))
            base = int(text[-1]) + 1 if text.numel() else top + 1
            full = full_grid_positions(base, gh, gw)
            pieces.append(full[:, :length])  # placeholders; the kept tokens' own ids are set in forward
            top = int(full.max())
            st = offset + length
        if st < len(input_tokens):
            pieces.append((torch.arange(len(input_tokens) - st) + top + 1).expand(3, -1))
        positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
        delta = int(positions.max()) + 1 - len(input_tokens)
        return positions, delta

    # --- step 2: full image embeddings kept aside ------------------------------------------------
    def embed_multimodal(self, **kwargs):
        if self.ivcp_method is None:
            return super().embed_multimodal(**kwargs)
        if kwargs.get("pixel_values_videos") is not None or kwargs.get("video_embeds") is not None:
            raise ValueError("ivcp's vLLM plugin prunes images only; this request has a video")
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        merge = self.visual.spatial_merge_size
        out = []
        for emb, (_, h, w) in zip(self._process_image_input(image_input), image_input["image_grid_thw"].tolist()):
            gh, gw = h // merge, w // merge
            key = self._next_key
            self._next_key += 1
            self._store[key] = (emb, gh, gw)
            while len(self._store) > _STORE_SIZE:
                self._store.popitem(last=False)
            placeholder = torch.zeros(kept_visual_count(self.ivcp_method, gh, gw), emb.shape[-1], dtype=emb.dtype,
                                      device=emb.device)
            placeholder[:, 0] = TAG
            placeholder[:, 1], placeholder[:, 2], placeholder[:, 3] = key % _BASE, key // _BASE % _BASE, key // _BASE ** 2
            out.append(placeholder)
        return tuple(out)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None, **kwargs):
        self._batch_ids = input_ids
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)

    # --- step 3: the pruned prefill ----------------------------------------------------------------
    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if self.ivcp_method is None or inputs_embeds is None or self._batch_ids is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        plans = self._plans(positions, inputs_embeds)
        if not plans:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        return self._pruned_forward(positions, inputs_embeds, plans)

    def _requests(self, n_tokens: int):
        """(start, end, computed) of every request in this step's flattened batch."""
        metadata = get_forward_context().attn_metadata
        if metadata is None:
            return None
        if isinstance(metadata, list):
            raise ValueError("ivcp's vLLM plugin does not support micro-batching")
        meta = next(iter(metadata.values()))
        starts = meta.query_start_loc.tolist()
        seq_lens = meta.seq_lens.tolist()
        return [(a, b, s - (b - a)) for a, b, s in zip(starts[:-1], starts[1:], seq_lens) if a < n_tokens]

    def _plans(self, positions, inputs_embeds) -> list[dict]:
        ids = self._batch_ids
        tagged = (ids[: inputs_embeds.shape[0]] == self.config.image_token_id) & (inputs_embeds[: ids.shape[0], 0] == TAG)
        if not bool(tagged.any()):
            return []
        requests = self._requests(ids.shape[0])
        if requests is None:
            return []
        plans = []
        for start, end, computed in requests:
            if not bool(tagged[start:end].any()):
                continue
            if computed:
                raise ValueError(f"ivcp: a prompt's images must be prefilled in one step with the whole prompt, but "
                                 f"this step starts after {computed} computed tokens (chunked prefill or a prefix-cache "
                                 "hit); serve with enable_chunked_prefill=False and enable_prefix_caching=False")
            plans.append(self._prefill(start, end, ids[start:end], positions[:, start:end], inputs_embeds[start:end]))
        return plans

    @torch.no_grad()
    def _prefill(self, start: int, end: int, ids: torch.Tensor, positions: torch.Tensor, embeds: torch.Tensor) -> dict:
        """The side path of one request: its full prompt through layers < K, the selection, and what the
        batch's layers need (kept rows' positions, keys, values and hidden states)."""
        image_token = self.config.image_token_id
        full_ids, full_emb, full_pos, grids, runs = [], [], [], [], []
        i, n = 0, ids.shape[0]
        while i < n:
            if int(ids[i]) != image_token:
                j = i
                while j < n and int(ids[j]) != image_token:
                    j += 1
                full_ids.append(ids[i:j]), full_emb.append(embeds[i:j]), full_pos.append(positions[:, i:j])
                i = j
                continue
            j = i
            while j < n and int(ids[j]) == image_token:
                j += 1
            row = embeds[i]
            if float(row[0]) != TAG:
                raise ValueError("ivcp: an image's placeholder rows carry no stored image (was the encoder output "
                                 "taken from a cache the plugin did not fill?)")
            key = int(row[1]) + int(row[2]) * _BASE + int(row[3]) * _BASE ** 2
            if key not in self._store:
                raise ValueError("ivcp: an image's full embeddings were evicted before its prefill ran")
            emb, gh, gw = self._store[key]
            if j - i != kept_visual_count(self.ivcp_method, gh, gw):
                raise ValueError(f"ivcp: {j - i} placeholders for an image that keeps "
                                 f"{kept_visual_count(self.ivcp_method, gh, gw)} tokens")
            base = int(positions[0, i - 1]) + 1 if i else 0
            start_full = sum(x.shape[0] for x in full_ids)
            full_ids.append(torch.full((gh * gw,), image_token, dtype=ids.dtype, device=ids.device))
            full_emb.append(emb.to(embeds.dtype))
            full_pos.append(full_grid_positions(base, gh, gw).to(positions.device, positions.dtype))
            grids.append([1, 2 * gh, 2 * gw])
            runs.append((start_full, start_full + gh * gw, j - i))
            i = j
        full_ids, full_emb, full_pos = torch.cat(full_ids), torch.cat(full_emb), torch.cat(full_pos, dim=1)
        hidden, keys, values = self._side_layers(full_emb, full_pos)
        kept = self._select(full_ids, full_pos, grids, hidden)
        if kept.numel() != n:
            raise ValueError(f"ivcp: the selection kept {kept.numel()} tokens where the scheduler reserved {n}")
        for a, b, length in runs:
            got = int(((kept >= a) & (kept < b)).sum())
            if got != length:
                raise ValueError(f"ivcp: the selection kept {got} tokens of an image given {length} slots")
        if self._record_path:
            with open(self._record_path, "a") as f:
                f.write(json.dumps({"prompt_ids": full_ids.tolist(), "kept": kept.tolist(), "kv_length": n,
                                    "n_visual": sum(b - a for a, b, _ in runs)}) + "\n")
        return {"rows": torch.arange(start, end, device=ids.device), "positions": full_pos[:, kept],
                "hidden": [h[kept] for h in hidden], "keys": [k[kept] for k in keys],
                "values": [v[kept] for v in values]}

    def _decoder(self):
        model = self.language_model.model
        return model, list(model.layers[model.start_layer: model.end_layer])

    def _side_layers(self, hidden: torch.Tensor, positions: torch.Tensor):
        """Layers 0 … K over a whole prompt (causal attention, no cache): the input hidden states of
        layers 0 … K and the rotated keys and values of layers 0 … K−1."""
        _, layers = self._decoder()
        inputs, keys, values = [hidden], [], []
        for layer in layers[: self._layer]:
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            qkv, _ = attn.qkv_proj(x)
            q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            q, k = attn.rotary_emb(positions, q, k)
            keys.append(k), values.append(v)
            s = hidden.shape[0]
            out = F.scaled_dot_product_attention(
                q.view(s, attn.num_heads, -1).transpose(0, 1), k.view(s, attn.num_kv_heads, -1).transpose(0, 1),
                v.view(s, attn.num_kv_heads, -1).transpose(0, 1), is_causal=True, scale=attn.scaling,
                enable_gqa=attn.num_heads != attn.num_kv_heads)
            out, _ = attn.o_proj(out.transpose(0, 1).reshape(s, -1))
            hidden = hidden + out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            inputs.append(hidden)
        return inputs, keys, values

    def _select(self, ids: torch.Tensor, positions: torch.Tensor, grids, hidden) -> torch.Tensor:
        adapter = self._adapter
        grid = torch.tensor(grids, dtype=torch.long)
        segments = adapter.batch_segments(ids[None], grid, None, positions[:, None])[0]
        visual = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for seg in segments:
            visual[seg.start: seg.end] = True
        ctx = VllmContext(self, hidden, layer=self._layer, stage=0, rope=adapter.rope, input_ids=ids, segments=segments,
                          visual=visual, alive=torch.arange(ids.shape[0], device=ids.device), position_ids=positions,
                          last_token=ids.shape[0] - 1, marker_token_ids=adapter.marker_token_ids,
                          turn_end_token_ids=adapter.turn_end_token_ids)
        chosen = torch.as_tensor(self.ivcp_method.select(ctx), dtype=torch.long, device=ids.device).flatten()
        if chosen.numel() != torch.unique(chosen).numel() or not bool(visual[chosen].all()):
            raise ValueError(f"{self.ivcp_method.name} returned token indices that are not distinct visual tokens")
        keep = ~visual
        keep[-1] = True
        keep[chosen] = True
        return keep.nonzero().flatten()

    def _pruned_forward(self, positions: torch.Tensor, inputs_embeds: torch.Tensor, plans: list[dict]):
        model, layers = self._decoder()
        positions = positions.clone()
        for plan in plans:
            positions[:, plan["rows"]] = plan["positions"]
        hidden, residual = inputs_embeds, None
        for index, layer in enumerate(layers):
            if index >= self._layer:
                hidden, residual = layer(positions, hidden, residual)
                continue
            if residual is None:
                residual = hidden
                hidden = layer.input_layernorm(hidden)
            else:
                hidden, residual = layer.input_layernorm(hidden, residual)
            attn = layer.self_attn
            qkv, _ = attn.qkv_proj(hidden)
            q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            q, k = attn.rotary_emb(positions, q, k)
            k, v = k.clone(), v.clone()
            for plan in plans:  # the kept tokens' keys and values of the full prompt go into their slots
                k[plan["rows"]] = plan["keys"][index].to(k.dtype)
                v[plan["rows"]] = plan["values"][index].to(v.dtype)
            out, _ = attn.o_proj(attn.attn(q, k, v))
            hidden, residual = layer.post_attention_layernorm(out, residual)
            hidden = layer.mlp(hidden)
            hidden, residual = hidden.clone(), residual.clone()
            for plan in plans:  # and their hidden states of the full prompt go on to the next layer
                hidden[plan["rows"]] = 0
                residual[plan["rows"]] = plan["hidden"][index + 1].to(residual.dtype)
        hidden, _ = model.norm(hidden, residual)
        return hidden


class VllmContext(SelectionContext):
    """A selection context over the plugin's side path: one request's full prompt, its layers' inputs."""

    def __init__(self, model: IvcpQwen2_5_VLForConditionalGeneration, hidden: list[torch.Tensor], **facts: Any):
        layers = model._decoder()[1]
        super().__init__(attention_scale=lambda index: layers[index].self_attn.scaling, **facts)
        self._layers, self._hidden = layers, hidden

    def _projection(self, which: str, layer: int, tokens, norm: bool = True, rotary: bool = True) -> torch.Tensor:
        tokens = self._check_present(tokens)
        module = self._layers[layer]
        attn = module.self_attn
        x = self._hidden[layer][tokens]
        if norm:
            x = module.input_layernorm(x)
        qkv, _ = attn.qkv_proj(x)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        if rotary and which != "v":
            q, k = attn.rotary_emb(self._position_ids[:, tokens], q, k)
        out = {"q": q, "k": k, "v": v}[which]
        return out.view(1, tokens.numel(), -1, attn.head_dim).transpose(1, 2)

    def hidden_states(self, tokens) -> torch.Tensor:
        return self._hidden[self.layer][self._check_present(tokens)][None]


def full_grid_positions(base: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(3, gh·gw) M-RoPE ids of an image whose first token is at ``base``: (base, base + row, base + col)."""
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    return torch.stack([torch.zeros_like(rows), rows, cols]) + base


def check_engine(vllm_config) -> None:
    """Refuse, with one clear line, the engine settings the plugin cannot keep exact."""
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        raise ValueError("ivcp's vLLM plugin runs on one device: the selection's scores average over all heads "
                         "(a reduction across tensor-parallel ranks it does not do); use tensor_parallel_size=1 "
                         "and pipeline_parallel_size=1")
    if vllm_config.cache_config.enable_prefix_caching:
        raise ValueError("ivcp's vLLM plugin needs enable_prefix_caching=False: which image tokens a block holds "
                         "depends on the text after the image, so blocks cannot be shared by prefix")
    if vllm_config.scheduler_config.enable_chunked_prefill:
        raise ValueError("ivcp's vLLM plugin needs enable_chunked_prefill=False: the selection reads the whole "
                         "prompt (the text after each image), so a prompt must be prefilled in one step")
    if vllm_config.model_config.multimodal_config.is_multimodal_pruning_enabled():
        raise ValueError("ivcp's vLLM plugin and vLLM's own video pruning (video_pruning_rate) cannot be combined")
