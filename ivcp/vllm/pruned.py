"""The pruned prefill inside a vLLM model, shared by the Qwen-VL families (design: docs/vllm.md).

How one prompt's prefill runs:

1. the processor gives each image ``n_kept`` placeholder tokens (known from its grid, or for
   ``drop_ivc`` / IVC tokens alone from its grid and its first token's M-RoPE id, read off the prompt in
   a second layout pass: :func:`ivcp.vllm.method.kept_visual_count`), so the scheduler reserves KV slots
   for the pruned prompt only; the M-RoPE positions of the text are the unpruned model's, the decode delta follows.
   The method is the model's (``hf_overrides``) or the request's (``mm_processor_kwargs``
   ``{"ivcp_method": ..., "ivcp_params": {...}}``); the processor validates it and hands it to the model
   as a per-image field (``ivcp_spec``);
2. ``embed_multimodal`` runs the vision tower, keeps each pruned image's full embeddings in a side
   store and hands vLLM ``n_kept`` tagged placeholder rows (unpruned images: their embeddings);
3. ``forward`` finds the requests whose whole prompt is in this step with tagged rows, rebuilds each
   full prompt (text embeddings + full image embeddings + original positions), runs layers < K over it
   on a side path, asks the method (unchanged, through a :class:`~ivcp.selection.SelectionContext`) which
   visual tokens to keep, then runs the batch through vLLM's layers: in layers < K the request's rows
   write the side path's keys / values of the kept tokens into their paged-KV slots (vLLM's own
   attention call) and take the side path's hidden states; layers ≥ K run as usual on the kept tokens
   with their original positions (and, for Qwen3-VL, the kept tokens' deepstack features);
4. decoding is plain vLLM.
"""

from __future__ import annotations

import functools
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from vllm.forward_context import get_forward_context
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

from ..adapters import adapter_for
from ..selection import SelectionContext
from .method import full_grid_positions, kept_visual_count, needs_position, resolve

TAG = 77.0  # channel 0 of a placeholder row: the row stands for a stored image
_BASE = 200  # the store key in channels 1..3, base 200 (exact in any float dtype down to bf16)
_STORE_SIZE = 512
SPEC_BYTES = 1024  # a method spec travels to the model as this many bytes of JSON per image
REQUEST_KEYS = ("ivcp_method", "ivcp_params")
UNPRUNED = (None, "", "none", "vanilla")


def model_spec(hf_config) -> tuple[str | None, dict]:
    """The method the model was loaded with (``hf_overrides={"ivcp_method": ..., "ivcp_params": {...}}``)."""
    name = getattr(hf_config, "ivcp_method", None)
    return (None if name in UNPRUNED else name), dict(getattr(hf_config, "ivcp_params", None) or {})


def request_spec(hf_config, mm_kwargs: dict) -> tuple[str | None, dict]:
    """The method of one request: ``mm_processor_kwargs``' ``ivcp_method`` / ``ivcp_params`` (popped from
    ``mm_kwargs``) or, without them, the model's."""
    name = mm_kwargs.pop("ivcp_method", None)
    params = mm_kwargs.pop("ivcp_params", None)
    if name is None:
        if params is not None:
            raise ValueError("ivcp: mm_processor_kwargs gives ivcp_params without ivcp_method")
        return model_spec(hf_config)
    if not isinstance(name, str):
        raise ValueError(f"ivcp: mm_processor_kwargs' ivcp_method must be a method name, got {name!r}")
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"ivcp: mm_processor_kwargs' ivcp_params must be a dict of parameters, got {params!r}")
    if name in UNPRUNED:
        if params:
            raise ValueError(f"ivcp: ivcp_method={name!r} (unpruned) takes no ivcp_params")
        return None, {}
    return name, dict(params or {})


def encode_spec(name: str | None, params: dict) -> torch.Tensor:
    data = json.dumps([name, params], sort_keys=True).encode()
    if len(data) > SPEC_BYTES:
        raise ValueError(f"ivcp: the method's parameters are too long ({len(data)} bytes of JSON, at most {SPEC_BYTES})")
    out = torch.zeros(SPEC_BYTES, dtype=torch.uint8)
    out[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out


def decode_spec(row: torch.Tensor) -> str:
    data = bytes(row.to(torch.uint8).tolist()).rstrip(b"\0")
    return data.decode()


@functools.lru_cache(maxsize=64)
def _resolved(family: str, num_layers: int, hidden_size: int, spec: str):
    name, params = json.loads(spec)
    return None if name is None else resolve(family, num_layers, hidden_size, name, params)


def method_for(hf_config, spec: str):
    """The validated method object of a JSON spec ``[name, params]`` (None: unpruned); ivcp's errors."""
    text = hf_config.get_text_config()
    return _resolved(hf_config.model_type, text.num_hidden_layers, text.hidden_size, spec)


def method_of(hf_config):
    """The method object the model was loaded with, or None."""
    name, params = model_spec(hf_config)
    return method_for(hf_config, json.dumps([name, params], sort_keys=True))


class PrunedProcessorMixin:
    """A Qwen-VL processor whose images get as many placeholders as their method keeps."""

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        hf_kwargs = dict(hf_kwargs)
        name, params = request_spec(self.info.get_hf_config(), hf_kwargs)
        method_for(self.info.get_hf_config(), json.dumps([name, params], sort_keys=True))  # ivcp's errors, here
        out = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        if name is not None and ("video_grid_thw" in out or "pixel_values_videos" in out):
            raise ValueError("ivcp's vLLM plugin prunes images only; this request has a video (send "
                             "mm_processor_kwargs={'ivcp_method': 'none'} to serve it unpruned)")
        if "image_grid_thw" in out:
            out["ivcp_spec"] = encode_spec(name, params)[None].repeat(len(out["image_grid_thw"]), 1)
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, _without_ivcp(hf_processor_mm_kwargs)))
        fields["ivcp_spec"] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        hf_processor_mm_kwargs = _without_ivcp(hf_processor_mm_kwargs)
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        config = self.info.get_hf_config()
        merge = self.info.get_image_processor(**hf_processor_mm_kwargs).merge_size
        image_token = config.image_token_id

        def replacement(item_idx: int, original):
            item = out_mm_kwargs["image"][item_idx]
            method = method_for(config, decode_spec(item["ivcp_spec"].data))
            if method is None:
                return original(item_idx) if callable(original) else original
            _, h, w = (int(x) for x in item["image_grid_thw"].data)
            if needs_position(method):  # the full count for now; _maybe_apply_prompt_updates sets the kept one
                return PositionalCount(full=[image_token] * (h // merge * (w // merge)), method=method,
                                       grid=(h // merge, w // merge))
            return [image_token] * kept_visual_count(method, h // merge, w // merge)

        return [PromptReplacement(modality="image", target=u.target,
                                  replacement=functools.partial(replacement, original=u.replacement))
                if u.modality == "image" else u for u in updates]

    def _maybe_apply_prompt_updates(self, mm_items, mm_res):
        """Two layout passes where an image's kept count depends on its position (``drop_ivc``, IVC tokens
        alone): lay the prompt out with every such image at its full count, read each one's first M-RoPE id
        off that layout (the unpruned model's ids: text continues after an image from its largest id), then
        lay it out again with the kept counts. Which images, and their grids, come with their prompt
        updates (:class:`PositionalCount`), which vLLM's processor cache keeps even where it drops the
        item's data (a repeated picture)."""
        images = mm_res.prompt_updates.get("image") or []
        positional = [isinstance(item[0].content, PositionalCount) for item in images if item]
        if not any(positional):
            return super()._maybe_apply_prompt_updates(mm_items, mm_res)
        if not all(positional) or len(positional) != len(images):
            raise ValueError("ivcp: the images of one request carry different methods")
        _, placeholders = super()._maybe_apply_prompt_updates(mm_items, mm_res)
        if any(modality != "image" for modality in placeholders):
            raise ValueError("ivcp's vLLM plugin prunes images only; this request has a video")
        config = self.info.get_hf_config()
        rope = _rope(config)
        counts, top, end = {}, -1, 0
        for place in sorted(placeholders["image"], key=lambda p: p.start_idx):
            base = top + 1 + place.start_idx - end
            content = images[place.item_idx][0].content
            counts[place.item_idx] = kept_visual_count(content.method, *content.grid, base=base, rope=rope)
            top, end = base + max(content.grid) - 1, place.start_idx + place.length
        updates = dict(mm_res.prompt_updates)
        updates["image"] = [[u.with_content([config.image_token_id] * counts[index]) for u in item_updates]
                            for index, item_updates in enumerate(images)]
        return super()._maybe_apply_prompt_updates(mm_items, mm_res._replace(prompt_updates=updates))


@dataclass
class PositionalCount(PromptUpdateDetails):
    """An image's provisional placeholders (its full count) where the kept count depends on the image's
    position: the method and the merged grid the second layout pass needs."""

    method: Any = None
    grid: tuple[int, int] = (0, 0)


def _rope(hf_config):
    """The rope (ivcp's RopeSpec) of a model's config, as the adapter reads it."""
    return adapter_for(SimpleNamespace(config=hf_config)).rope


def _without_ivcp(kwargs) -> dict:
    return {k: v for k, v in kwargs.items() if k not in REQUEST_KEYS}


class PrunedPrefillMixin:
    """A Qwen-VL model class of vLLM with ivcp's pruning inside the LLM (before the family's class in the
    bases). Images of requests without a method go through the family's own code."""

    def _ivcp_init(self, vllm_config) -> None:
        check_engine(vllm_config)
        self._store: OrderedDict[int, tuple[torch.Tensor, int, int, Any]] = OrderedDict()
        self._next_key = 1
        self._batch_ids: torch.Tensor | None = None
        self._record_path = os.environ.get("IVCP_VLLM_RECORD")
        self._adapter = adapter_for(SimpleNamespace(config=self.config))

    # --- family hooks (Qwen3-VL: deepstack) ------------------------------------------------------
    def _visual_width(self) -> int:
        """Channels of a merged visual token that enter the LLM's input (the rest: deepstack features)."""
        return self.config.get_text_config().hidden_size

    def _batch_additions(self, n_tokens: int) -> list[torch.Tensor] | None:
        """Features vLLM adds after decoder layer l to this step's rows (Qwen3-VL's deepstack), or None."""
        return None

    def _done_additions(self, n_tokens: int) -> None:
        pass

    # --- step 1: kept-count layout of positions ----------------------------------------------------
    def get_mrope_input_positions(self, input_tokens, mm_features):
        if any(feature.modality != "image" for feature in mm_features):
            return super().get_mrope_input_positions(input_tokens, mm_features)  # unpruned (the processor checks)
        pieces, st, top = [], 0, -1
        merge = self.config.vision_config.spatial_merge_size
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            offset, length = feature.mm_position.offset, feature.mm_position.length
            _, h, w = feature.data["image_grid_thw"].data.tolist()
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
        delta = int(positions.max()) + 1 - len(input_tokens) if pieces else 0
        return positions, delta

    # --- step 2: full image embeddings kept aside ------------------------------------------------
    def embed_multimodal(self, **kwargs):
        specs = kwargs.pop("ivcp_spec", None)
        if specs is None or (kwargs.get("pixel_values") is None and kwargs.get("image_embeds") is None):
            return super().embed_multimodal(**kwargs)
        if kwargs.get("pixel_values_videos") is not None or kwargs.get("video_embeds") is not None:
            methods = {decode_spec(row) for row in specs}
            if any(method_for(self.config, spec) is not None for spec in methods):
                raise ValueError("ivcp's vLLM plugin prunes images only; this batch has a video")
            return super().embed_multimodal(**kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        merge = self.visual.spatial_merge_size
        out = []
        embeddings = self._process_image_input(image_input)
        for emb, (_, h, w), spec in zip(embeddings, image_input["image_grid_thw"].tolist(), specs):
            method = method_for(self.config, decode_spec(spec))
            if method is None:
                out.append(emb)
                continue
            gh, gw = h // merge, w // merge
            key = self._next_key
            self._next_key += 1
            self._store[key] = (emb, gh, gw, method)
            while len(self._store) > _STORE_SIZE:
                self._store.popitem(last=False)
            # a count that depends on the image's position (unknown here): the full count, of which vLLM
            # copies the first n_kept rows into the placeholders (any rows do: all carry the same tag)
            rows = gh * gw if needs_position(method) else kept_visual_count(method, gh, gw)
            placeholder = torch.zeros(rows, emb.shape[-1], dtype=emb.dtype, device=emb.device)
            placeholder[:, 0] = TAG
            placeholder[:, 1], placeholder[:, 2], placeholder[:, 3] = key % _BASE, key // _BASE % _BASE, key // _BASE ** 2
            out.append(placeholder)
        return tuple(out)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None, **kwargs):
        self._batch_ids = input_ids
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)

    # --- step 3: the pruned prefill ----------------------------------------------------------------
    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None or self._batch_ids is None or _capturing(inputs_embeds):
            # a CUDA graph being captured holds no pruned prefill (and may not sync with the host)
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
        prompts = []
        for start, end, computed in requests:
            if not bool(tagged[start:end].any()):
                continue
            if computed:
                raise ValueError(f"ivcp: a prompt's images must be prefilled in one step with the whole prompt, but "
                                 f"this step starts after {computed} computed tokens (chunked prefill or a prefix-cache "
                                 "hit); serve with enable_chunked_prefill=False and enable_prefix_caching=False")
            prompts.append(self._full_prompt(start, end, ids[start:end], positions[:, start:end],
                                             inputs_embeds[start:end], tagged[start:end]))
        if not prompts:
            return []
        sides = self._side_layers(prompts)
        return [self._plan(prompt, *side) for prompt, side in zip(prompts, sides)]

    def _full_prompt(self, start: int, end: int, ids: torch.Tensor, positions: torch.Tensor, embeds: torch.Tensor,
                     tagged: torch.Tensor) -> dict:
        """One pruned request's full prompt, rebuilt from its placeholders: token ids, input embeddings (the
        stored full image embeddings in place of the tagged rows), original M-RoPE ids, grids, and where each
        image's tokens run (full start, full end, kept count)."""
        image_token = self.config.image_token_id
        width = self._visual_width()
        full_ids, full_emb, full_extra, full_pos, grids, runs = [], [], [], [], [], []
        method = None
        i, n = 0, ids.shape[0]
        while i < n:
            if not bool(tagged[i]):
                j = i
                while j < n and not bool(tagged[j]):
                    j += 1
                full_ids.append(ids[i:j]), full_emb.append(embeds[i:j]), full_pos.append(positions[:, i:j])
                full_extra.append(None)
                i = j
                continue
            row = embeds[i]
            key = int(row[1]) + int(row[2]) * _BASE + int(row[3]) * _BASE ** 2
            if key not in self._store:
                raise ValueError("ivcp: an image's full embeddings were evicted before its prefill ran")
            emb, gh, gw, image_method = self._store[key]
            base = int(positions[0, i - 1]) + 1 if i else 0
            length = kept_visual_count(image_method, gh, gw, base=base, rope=self._adapter.rope)
            j = i + length
            if j > n or not bool(tagged[i:j].all()):
                raise ValueError(f"ivcp: fewer placeholders than the {length} tokens an image keeps")
            if method is not None and image_method is not method:
                raise ValueError("ivcp: the images of one request carry different methods")
            method = image_method
            start_full = sum(x.shape[0] for x in full_ids)
            full_ids.append(torch.full((gh * gw,), image_token, dtype=ids.dtype, device=ids.device))
            full_emb.append(emb[:, :width].to(embeds.dtype))
            full_extra.append(emb[:, width:])
            full_pos.append(full_grid_positions(base, gh, gw).to(positions.device, positions.dtype))
            grids.append([1, 2 * gh, 2 * gw])
            runs.append((start_full, start_full + gh * gw, length))
            i = j
        return {"start": start, "end": end, "method": method, "layer": method.selection_layers()[0],
                "ids": torch.cat(full_ids), "embeds": torch.cat(full_emb), "positions": torch.cat(full_pos, dim=1),
                "grids": grids, "runs": runs, "additions": self._full_additions(full_emb, full_extra)}

    @torch.no_grad()
    def _plan(self, prompt: dict, hidden: list[torch.Tensor], keys: list[torch.Tensor], values: list[torch.Tensor]) -> dict:
        """The selection on one request's side path, and what the batch's layers need from it (the kept rows'
        positions, keys, values, hidden states and later additions)."""
        method, layer, full_ids, full_pos = prompt["method"], prompt["layer"], prompt["ids"], prompt["positions"]
        n, runs, additions = prompt["end"] - prompt["start"], prompt["runs"], prompt["additions"]
        kept = self._select(method, layer, full_ids, full_pos, prompt["grids"], hidden)
        if kept.numel() != n:
            raise ValueError(f"ivcp: the selection kept {kept.numel()} tokens where the scheduler reserved {n}")
        for a, b, length in runs:
            got = int(((kept >= a) & (kept < b)).sum())
            if got != length:
                raise ValueError(f"ivcp: the selection kept {got} tokens of an image given {length} slots")
        if self._record_path:
            with open(self._record_path, "a") as f:
                f.write(json.dumps({"prompt_ids": full_ids.tolist(), "kept": kept.tolist(), "kv_length": n,
                                    "method": repr(method), "n_visual": sum(b - a for a, b, _ in runs)}) + "\n")
        return {"rows": torch.arange(prompt["start"], prompt["end"], device=full_ids.device), "layer": layer,
                "positions": full_pos[:, kept], "hidden": [h[kept] for h in hidden], "keys": [k[kept] for k in keys],
                "values": [v[kept] for v in values],
                "additions": None if additions is None else [a[kept] for a in additions]}

    def _full_additions(self, embeds: list[torch.Tensor], extras: list[torch.Tensor | None]):
        """Per-level features added after layers 0, 1, … to a whole prompt's rows (Qwen3-VL), or None."""
        return None

    def _decoder(self):
        model = self.language_model.model
        return model, list(model.layers[model.start_layer: model.end_layer])

    @torch.no_grad()
    def _side_layers(self, prompts: list[dict]) -> list[tuple[list, list, list]]:
        """Layers 0 … K−1 over the full prompts of a step's pruned requests, together (one projection and MLP
        call per layer for all of them; causal attention within each prompt, no cache). Per prompt: the
        input hidden states of layers 0 … K and the rotated keys and values of layers 0 … K−1 (its own K)."""
        _, layers = self._decoder()
        depth = max(prompt["layer"] for prompt in prompts)
        ends = torch.tensor([prompt["ids"].shape[0] for prompt in prompts]).cumsum(0).tolist()
        spans = list(zip([0] + ends[:-1], ends))
        hidden = torch.cat([prompt["embeds"] for prompt in prompts])
        positions = torch.cat([prompt["positions"] for prompt in prompts], dim=1)
        additions = None
        if prompts[0]["additions"] is not None:
            additions = [torch.cat(level) for level in zip(*(prompt["additions"] for prompt in prompts))]
        inputs, keys, values = [hidden], [], []
        for index, layer in enumerate(layers[:depth]):
            attn = layer.self_attn
            q, k, v = qkv(attn, layer.input_layernorm(hidden), positions)
            keys.append(k), values.append(v)
            out = torch.empty_like(q)
            for a, b in spans:
                s = b - a
                out[a:b] = F.scaled_dot_product_attention(
                    q[a:b].view(s, attn.num_heads, -1).transpose(0, 1), k[a:b].view(s, attn.num_kv_heads, -1).transpose(0, 1),
                    v[a:b].view(s, attn.num_kv_heads, -1).transpose(0, 1), is_causal=True, scale=attn.scaling,
                    enable_gqa=attn.num_heads != attn.num_kv_heads).transpose(0, 1).reshape(s, -1)
            out, _ = attn.o_proj(out)
            hidden = hidden + out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            if additions is not None and index < len(additions):
                hidden = hidden + additions[index].to(hidden.dtype)
            inputs.append(hidden)
        return [([h[a:b] for h in inputs[: prompt["layer"] + 1]], [k[a:b] for k in keys[: prompt["layer"]]],
                 [v[a:b] for v in values[: prompt["layer"]]]) for prompt, (a, b) in zip(prompts, spans)]

    def _select(self, method, layer: int, ids: torch.Tensor, positions: torch.Tensor, grids, hidden) -> torch.Tensor:
        adapter = self._adapter
        grid = torch.tensor(grids, dtype=torch.long)
        segments = adapter.batch_segments(ids[None], grid, None, positions[:, None])[0]
        visual = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for seg in segments:
            visual[seg.start: seg.end] = True
        ctx = VllmContext(self, hidden, layer=layer, stage=0, rope=adapter.rope, input_ids=ids, segments=segments,
                          visual=visual, alive=torch.arange(ids.shape[0], device=ids.device), position_ids=positions,
                          last_token=ids.shape[0] - 1, marker_token_ids=adapter.marker_token_ids,
                          turn_end_token_ids=adapter.turn_end_token_ids)
        chosen = torch.as_tensor(method.select(ctx), dtype=torch.long, device=ids.device).flatten()
        if chosen.numel() != torch.unique(chosen).numel() or not bool(visual[chosen].all()):
            raise ValueError(f"{method.name} returned token indices that are not distinct visual tokens")
        keep = ~visual
        keep[-1] = True
        keep[chosen] = True
        return keep.nonzero().flatten()

    def _pruned_forward(self, positions: torch.Tensor, inputs_embeds: torch.Tensor, plans: list[dict]):
        model, layers = self._decoder()
        n = inputs_embeds.shape[0]
        positions = positions.clone()
        for plan in plans:
            positions[:, plan["rows"]] = plan["positions"]
        additions = self._batch_additions(n)
        if additions is not None:
            additions = [a.clone() for a in additions]
            for plan in plans:  # after layer K−1 the side path's states already hold them; later: the kept tokens'
                for level in range(plan["layer"], len(additions)):
                    additions[level][plan["rows"]] = plan["additions"][level].to(additions[level].dtype)
        hidden, residual = inputs_embeds, None
        for index, layer in enumerate(layers):
            if all(index >= plan["layer"] for plan in plans):
                hidden, residual = layer(positions, hidden, residual)
            else:
                hidden, residual = self._mixed_layer(layer, index, positions, hidden, residual, plans)
            if additions is not None and index < len(additions):
                hidden = hidden + additions[index]
        self._done_additions(n)
        hidden, _ = model.norm(hidden, residual)
        return hidden

    def _mixed_layer(self, layer, index: int, positions, hidden, residual, plans):
        """Layer ``index`` for the batch, where the requests of ``plans`` with K > index take their side
        path's keys, values (into their slots) and outputs. Their rows' own projections, attention outputs
        and MLP would be discarded, so only the other rows are computed; vLLM's attention call still takes
        every row (it writes the side path's keys and values into the requests' slots)."""
        side = [plan for plan in plans if index < plan["layer"]]
        n = hidden.shape[0]
        own = torch.ones(n, dtype=torch.bool, device=hidden.device)
        for plan in side:
            own[plan["rows"]] = False
        rows = own.nonzero().flatten()
        attn = layer.self_attn
        q = hidden.new_zeros(n, attn.q_size)  # the side rows' queries: any (their outputs are not used)
        k, v = hidden.new_empty(n, attn.kv_size), hidden.new_empty(n, attn.kv_size)
        if rows.numel():
            x, res = hidden[rows], None if residual is None else residual[rows]
            if res is None:
                x, res = layer.input_layernorm(x), x
            else:
                x, res = layer.input_layernorm(x, res)
            q[rows], k[rows], v[rows] = qkv(attn, x, positions[..., rows])
        for plan in side:  # the kept tokens' keys and values of the full prompt go into their slots
            k[plan["rows"]] = plan["keys"][index].to(k.dtype)
            v[plan["rows"]] = plan["values"][index].to(v.dtype)
        out = attn.attn(q, k, v)
        new_hidden = hidden.new_zeros(n, hidden.shape[-1])  # the side rows: hidden 0, residual = the side path's
        new_residual = hidden.new_empty(n, hidden.shape[-1])
        if rows.numel():
            x, _ = attn.o_proj(out[rows])
            x, res = layer.post_attention_layernorm(x, res)
            new_hidden[rows], new_residual[rows] = layer.mlp(x), res
        for plan in side:  # and their hidden states of the full prompt go on to the next layer
            new_residual[plan["rows"]] = plan["hidden"][index + 1].to(new_residual.dtype)
        return new_hidden, new_residual


def _capturing(tensor: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on ``tensor``'s device (vLLM captures decode steps)."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def qkv(attn, x: torch.Tensor, positions: torch.Tensor | None):
    """q, k, v of a vLLM Qwen attention module for inputs ``x`` (already normed): per-head q / k norms where
    the family has them (Qwen3), then the rotary at ``positions`` (None: not rotated)."""
    out, _ = attn.qkv_proj(x)
    q, k, v = out.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    if hasattr(attn, "q_norm"):
        q = attn.q_norm(q.reshape(*q.shape[:-1], -1, attn.head_dim)).reshape(q.shape)
        k = attn.k_norm(k.reshape(*k.shape[:-1], -1, attn.head_dim)).reshape(k.shape)
    if positions is not None:
        q, k = attn.rotary_emb(positions, q, k)
    return q, k, v


class VllmContext(SelectionContext):
    """A selection context over the plugin's side path: one request's full prompt, its layers' inputs."""

    def __init__(self, model: PrunedPrefillMixin, hidden: list[torch.Tensor], **facts: Any):
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
        q, k, v = qkv(attn, x, self._position_ids[:, tokens] if rotary and which != "v" else None)
        out = {"q": q, "k": k, "v": v}[which]
        return out.view(1, tokens.numel(), -1, attn.head_dim).transpose(1, 2)

    def hidden_states(self, tokens) -> torch.Tensor:
        return self._hidden[self.layer][self._check_present(tokens)][None]


def check_engine(vllm_config) -> None:
    """Refuse, with one clear line, the engine settings the plugin cannot keep exact (any request may be
    pruned, so these hold for the plugin's classes whatever the model's default method)."""
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
