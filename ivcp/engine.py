"""The pruning engine: hooks on an unmodified Hugging Face model.

``with ivcp.prune(model, "ivc_prune") as session:`` registers forward pre-hooks on the multimodal
model, the decoder stack and every decoder layer; plain ``model(**inputs)`` and
``model.generate(**inputs)`` then run pruned. Per prefill that holds visual tokens:

1. the multimodal model's hook finds the visual segments (each image, each video frame);
2. the decoder stack's hook records the rotary position ids of every token (original positions);
3. before each selection layer K the method picks the visual tokens to keep from signals of layers
   K−1 / K (value vectors, attention rows computed from q and the cached keys, never an attention
   matrix); the engine slices the hidden states, rotary cos/sin and mask for layers ≥ K and, for
   methods that ask for it, cuts the KV cache of layers < K to the same tokens;
4. decoding continues at the positions the unpruned model would use.

On exit all hooks are removed; the model's parameters and buffers are never modified.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from . import config as _config
from .adapters import ModelAdapter, Segment, adapter_for
from .methods import PruningMethod, make_method

_ACTIVE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _cache_kwarg(kwargs: dict):
    """The KV cache a forward received: ``cache`` from transformers 5.24 on, ``past_key_values`` before."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


@dataclass
class PrefillRecord:
    """What the engine did in the last prefill (batch row 0)."""

    segments: list[tuple[int, int]]
    kept: torch.Tensor  # sorted input-sequence indices seen by layers ≥ the last selection layer
    n_visual: int
    n_visual_kept: int
    kv_lengths: list[int]  # KV-cache length of every layer after prefill
    seq_len: int
    stages: list[dict[str, Any]] = field(default_factory=list)  # per selection: layer, n_visual_kept, kept
    marks: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. "ivc", "seed": input indices
    visual_kv_per_layer: list[int] = field(default_factory=list)  # visual tokens in each layer's KV
    selection_seconds: float = 0.0
    method: dict[str, Any] = field(default_factory=dict)

    @property
    def visual_kv_share(self) -> float:
        """Share of the visual KV entries kept, over all layers ("Average Tokens" in the paper)."""
        if not self.n_visual or not self.visual_kv_per_layer:
            return 1.0
        return sum(self.visual_kv_per_layer) / (self.n_visual * len(self.visual_kv_per_layer))


@dataclass
class _CacheInfo:
    """Kept with a pruned KV cache so decoding uses the unpruned model's positions."""

    dropped_layer0: int
    rope_delta: torch.Tensor  # (B, 1): position of token i is i + delta after the prompt
    rows: int
    n_layer0: int  # prompt tokens in layer 0's cache
    # per layer: which of layer 0's prompt entries it holds (None: the same as layer 0). A decode
    # mask is built for layer 0's cache; layers holding fewer tokens take these columns of it.
    columns: list[torch.Tensor | None]

    def layer_mask(self, layer: int, mask: torch.Tensor) -> torch.Tensor:
        cols = self.columns[layer]
        if cols is None:
            return mask
        return torch.cat([mask[..., cols.to(mask.device)], mask[..., self.n_layer0:]], dim=-1)


class _PrefillState:
    def __init__(self, input_ids: torch.Tensor, image_grid_thw, video_grid_thw, image_sizes=None):
        self.input_ids = input_ids
        self.grids = (image_grid_thw, video_grid_thw)
        self.image_sizes = image_sizes
        self.segments: list[Segment] = []
        self.seq_len = input_ids.shape[1]
        self.visual = torch.zeros(self.seq_len, dtype=torch.bool, device=input_ids.device)  # over the input
        self.kept = torch.arange(self.seq_len, device=input_ids.device)
        self.position_ids: torch.Tensor | None = None  # (rows, B, S)
        self.originals: dict[str, Any] | None = None  # layer kwargs of the full sequence
        self.layer_kwargs: dict[str, Any] | None = None  # the same, sliced to `kept`
        self.layer_tokens: dict[int, torch.Tensor] = {}  # input indices each layer processed / caches
        self.hidden_inputs: dict[int, torch.Tensor] = {}
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin of the current tokens
        self.current_positions: torch.Tensor | None = None  # rotary ids the current layers use
        self.hidden_updates: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.additions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer → (input indices, features)
        self.cache = None
        self.marks: dict[str, list[torch.Tensor]] = {}
        self.stages: list[dict[str, Any]] = []
        self.selection_seconds = 0.0


class SelectionContext:
    """A method's view of the prompt at a selection layer K. All token indices are positions in the
    input sequence ("global"); tensors keep the batch dimension first."""

    def __init__(self, session: "PruneSession", state: _PrefillState, layer: int):
        self._session, self._state, self.layer = session, state, layer
        self.stage = session.stage_layers.index(layer)  # 0 for the first selection, 1 for the next…
        self.rope = session.adapter.rope

    # --- the prompt ---------------------------------------------------------------------------
    @property
    def segments(self) -> list[Segment]:
        return self._state.segments

    @property
    def units(self) -> list[list[Segment]]:
        """The segments grouped by image / frame (a tiled image's tiles and thumbnail together), in order."""
        groups: dict[tuple, list[Segment]] = {}
        for seg in self._state.segments:
            groups.setdefault(seg.unit, []).append(seg)
        return list(groups.values())

    @property
    def device(self) -> torch.device:
        return self._state.input_ids.device

    @property
    def input_ids(self) -> torch.Tensor:
        return self._state.input_ids

    @property
    def last_token(self) -> int:
        """Index of the last prompt token (the one that generates)."""
        return self._state.seq_len - 1

    @property
    def alive(self) -> torch.Tensor:
        """Sorted indices of the tokens the layers before K processed."""
        return self._state.kept

    def visual_tokens(self, segment: Segment | None = None) -> torch.Tensor:
        """Sorted indices of the visual tokens still present (of one segment, or of all)."""
        alive = self._state.kept
        mask = self._state.visual[alive]
        if segment is not None:
            mask &= (alive >= segment.start) & (alive < segment.end)
        return alive[mask]

    def positions(self, segment: Segment) -> torch.Tensor:
        """Rotary position ids of a segment's tokens: (3, N) for M-RoPE, (N,) for 1-D RoPE."""
        pos = self._state.position_ids[:, 0, segment.start: segment.end]
        return pos[0] if pos.shape[0] == 1 else pos

    def text_queries(self, segment: Segment, offset: int = 0) -> torch.Tensor:
        """Text tokens that query a segment: those after it up to the end of the prompt (vision
        markup and other visual tokens excluded); if none, those before it in the same chat turn.
        ``offset`` k: only those from ``segment.end + k`` on (the authors' code starts at k = 2)."""
        state, adapter = self._state, self._session.adapter
        ids = state.input_ids[0]
        index = torch.arange(state.seq_len, device=ids.device)
        markers = torch.tensor(sorted(adapter.marker_token_ids), device=ids.device)
        text = ~state.visual & ~torch.isin(ids, markers)
        after = text & (index >= segment.end + offset)
        if after.any():
            return index[after]
        before = text & (index < segment.start)
        ends = torch.tensor(sorted(adapter.turn_end_token_ids), device=ids.device)
        turn_ends = index[torch.isin(ids, ends) & (index < segment.start)]
        if turn_ends.numel():
            before &= index > turn_ends.max()
        if not before.any():
            raise ValueError(f"no text tokens around the visual segment at {segment.start}:{segment.end} "
                             "to use as queries")
        return index[before]

    def update_hidden(self, tokens, values: torch.Tensor) -> None:
        """Replace the hidden states of ``tokens`` (kept ones) before layer K, e.g. to merge dropped
        tokens into them. ``values`` is (B, T, hidden)."""
        self._state.hidden_updates.append((self._local(tokens), values))

    def mark(self, name: str, tokens: torch.Tensor) -> None:
        """Record named token sets (e.g. "ivc", "seed") in ``session.last.marks``."""
        self._state.marks.setdefault(name, []).append(tokens.detach().to(torch.long).flatten())

    # --- signals from the model -------------------------------------------------------------
    def _local(self, tokens) -> torch.Tensor:
        tokens = torch.as_tensor(tokens, device=self.device, dtype=torch.long).flatten()
        pos = torch.searchsorted(self._state.kept, tokens)
        if pos.numel() and (pos.max() >= self._state.kept.numel() or (self._state.kept[pos] != tokens).any()):
            raise ValueError("asked for signals of tokens that were already pruned")
        return pos

    def _check_layer(self, layer: int) -> int:
        if layer not in (self.layer - 1, self.layer) or layer < 0:
            raise ValueError(f"signals are available from layers {self.layer - 1} and {self.layer} only "
                             f"(selection at layer {self.layer}), not {layer}")
        return layer

    def _projection(self, which: str, layer: int, tokens, norm: bool = True, rotary: bool = True) -> torch.Tensor:
        """(B, heads, T, d) projection ``which`` ∈ {q, k, v} of layer ``layer``'s input at ``tokens``."""
        adapter = self._session.adapter
        module = adapter.layers[layer]
        pos = self._local(tokens)
        hidden = self._state.hidden_inputs[layer][:, pos]
        if norm:
            hidden = adapter.input_norm(module)(hidden)
        out = adapter.project_heads(adapter.attention(module), which, hidden)
        if rotary and which != "v":
            cos, sin = self._state.rotary
            out = adapter.rotate(out, cos[:, pos].to(out.dtype), sin[:, pos].to(out.dtype))
        return out

    def _cached(self, layer: int):
        cache = self._state.cache
        if cache is None or layer != self.layer - 1 or len(cache.layers) <= layer:
            return None
        return cache.layers[layer]

    @torch.no_grad()
    def hidden_states(self, tokens) -> torch.Tensor:
        """Input hidden states of layer K at ``tokens``, (B, T, hidden), in the model's dtype. At K = 0
        these are the input embeddings: the vision tower's merged features for visual tokens."""
        return self._state.hidden_inputs[self.layer][:, self._local(tokens)]

    @property
    def vision_local_block(self) -> int:
        """The model's default local-attention vision block (Qwen2.5-VL: its first full-attention block)."""
        return self._session.adapter.vision_local_block

    @property
    def vision_global_block(self) -> int:
        """The last vision block whose output reaches the LLM."""
        return self._session.adapter.vision_global_block

    @property
    def vision_depth(self) -> int:
        return self._session.adapter.vision_depth

    @torch.no_grad()
    def vision_attention(self, segment: Segment, block: int) -> torch.Tensor:
        """Attention the segment's tokens receive in vision block ``block`` (mean over heads and
        queries, pooled over each merge group), (N,) in the segment's raster order."""
        return self._session.vision_attention(self._state.segments, block)[segment]

    @torch.no_grad()
    def values(self, tokens, layer: int | None = None, norm: bool = True) -> torch.Tensor:
        """Value vectors (v_proj output, no rotary) of layer K−1, float32, (B, kv_heads, T, d); with
        ``norm=False``, of the layer's input without its input norm (the authors' InternVL code)."""
        layer = self._check_layer(self.layer - 1 if layer is None else layer)
        cached = self._cached(layer)
        if cached is not None and norm:
            return cached.values[:, :, self._local(tokens)].float()
        return self._projection("v", layer, tokens, norm=norm).float()

    @torch.no_grad()
    def keys(self, tokens, layer: int | None = None, norm: bool = True, rotary: bool = True) -> torch.Tensor:
        """Key vectors of a layer's input (K−1 by default), float32, (B, kv_heads, T, d)."""
        layer = self._check_layer(self.layer - 1 if layer is None else layer)
        cached = self._cached(layer)
        if cached is not None and norm and rotary:
            return cached.keys[:, :, self._local(tokens)].float()
        return self._projection("k", layer, tokens, norm=norm, rotary=rotary).float()

    @torch.no_grad()
    def queries(self, tokens, layer: int | None = None, rotary: bool = True) -> torch.Tensor:
        """Query vectors of a layer's input (K−1 by default), float32, (B, heads, T, d)."""
        layer = self._check_layer(self.layer - 1 if layer is None else layer)
        return self._projection("q", layer, tokens, rotary=rotary).float()

    @torch.no_grad()
    def attention(self, query_tokens, key_tokens, layer: int | None = None, rotary: bool = True) -> torch.Tensor:
        """Attention probabilities of ``query_tokens`` to ``key_tokens`` at a layer, (B, heads, Q, T).

        Softmax runs over every present key the query sees (causal), as in the model; only the
        requested columns are returned. Computed from q and the (cached) keys: O(Q·S) work.
        """
        layer = self.layer - 1 if layer is None else layer
        q = self.queries(query_tokens, layer, rotary=rotary)
        k = self.keys(self._state.kept, layer, rotary=rotary)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scale = self._session.adapter.attention_scale(self._session.adapter.layers[layer])
        logits = (q @ k.transpose(-1, -2)) * scale  # (B, H, Q, S_alive)
        query_index = self._state.kept[self._local(query_tokens)]
        hidden = self._state.kept[None, :] > query_index[:, None]
        probs = logits.masked_fill(hidden, float("-inf")).softmax(-1)
        return probs[..., self._local(key_tokens)]

    def last_token_attention(self, layer: int | None = None, rotary: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(present visual tokens, the last prompt token's attention to each, mean over heads, batch row 0)
        at a layer (K−1 by default): the score of FastV and of the methods built on it."""
        visual = self.visual_tokens()
        return visual, self.attention([self.last_token], visual, layer, rotary)[0].mean(0)[0]


class PruneSession:
    """The hooks of one ``ivcp.prune`` block; ``last`` describes the last prefill."""

    def __init__(self, model: nn.Module, method: PruningMethod, adapter: ModelAdapter, sync_timing: bool = False):
        self.model, self.method, self.adapter = model, method, adapter
        self.sync_timing = sync_timing  # synchronise CUDA around the selection so its time is real
        self.stage_layers = method.selection_layers()
        self.last: PrefillRecord | None = None
        self._state: _PrefillState | None = None
        self._decoding: _CacheInfo | None = None  # set during a forward on a pruned cache
        self._caches: "weakref.WeakKeyDictionary[Any, _CacheInfo]" = weakref.WeakKeyDictionary()
        self._handles: list[Any] = []
        self._vision_blocks = method.vision_blocks(adapter)
        self._vision_calls: list[dict] = []  # per vision-tower call: grid_thw and block inputs
        self._vision_scores: dict[int, dict[Segment, torch.Tensor]] = {}

    # --- lifecycle ----------------------------------------------------------------------------
    def attach(self) -> None:
        a = self.adapter
        self._handles.append(a.multimodal_model.register_forward_pre_hook(self._on_model, with_kwargs=True))
        self._handles.append(a.multimodal_model.register_forward_hook(self._after_model, with_kwargs=True))
        self._handles.append(a.text_model.register_forward_pre_hook(self._on_text_model, with_kwargs=True))
        for index, layer in enumerate(a.layers):
            hook = lambda module, args, kwargs, index=index: self._on_layer(index, args, kwargs)  # noqa: E731
            self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        if self._vision_blocks:
            self._handles.append(a.vision_tower.register_forward_pre_hook(self._on_vision, with_kwargs=True))
            for block in sorted(set(self._vision_blocks)):
                module = a.vision_attention_module(block)
                hook = lambda module, args, kwargs, block=block: self._on_vision_block(block, module, args, kwargs)  # noqa: E731
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

        # generate() is checked before it runs: what hooks cannot tell apart (a beam is a batch row;
        # an image passed as embeddings never reaches the hooks as pixels) gets a clear error.
        generate = self.model.generate
        self._own_generate = vars(self.model).get("generate")  # an instance attribute someone set, if any

        @functools.wraps(generate)
        def checked_generate(*args, **kwargs):
            self._check_generate(kwargs)
            return generate(*args, **kwargs)

        self.model.generate = checked_generate

    def _check_generate(self, kwargs: dict) -> None:
        config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        beams = kwargs.get("num_beams", getattr(config, "num_beams", None) if config is not None else None) or 1
        if beams > 1:
            raise ValueError(f"ivcp does not support beam search (num_beams={beams}): each beam would need its own "
                             "pruned cache; use greedy or sampling decoding")
        if kwargs.get("input_ids") is None and kwargs.get("inputs_embeds") is not None and any(
                kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos")):
            raise ValueError("ivcp needs input_ids to find the image tokens: pass input_ids (with the pixels), "
                             "not inputs_embeds")

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._own_generate is None:
            vars(self.model).pop("generate", None)
        else:
            self.model.generate = self._own_generate
        self._state = None

    # --- vision tower -----------------------------------------------------------------------------
    def _on_vision(self, module, args, kwargs):
        self._vision_calls.append({"args": args, "kwargs": kwargs, "blocks": {}})

    def _on_vision_block(self, block: int, module, args, kwargs):
        if self._vision_calls:
            self._vision_calls[-1]["blocks"][block] = {"module": module, "args": args, "kwargs": kwargs}

    def vision_attention(self, segments: list[Segment], block: int) -> dict[Segment, torch.Tensor]:
        """Received attention of vision block ``block`` per segment. The tower encodes the images
        (in prompt order) before the videos (in prompt order), one call each."""
        if block not in self._vision_scores:
            per_frame: list[torch.Tensor] = []
            for call in self._vision_calls:
                if block not in call["blocks"]:
                    raise ValueError(f"vision block {block} did not run for this prompt")
                per_frame += self.adapter.received_attention(call, call["blocks"][block])
            ordered = sorted(segments, key=lambda s: (s.kind != "image", s.source, s.frame))
            if [t.numel() for t in per_frame] != [s.n for s in ordered]:
                raise ValueError("the vision tower's outputs do not line up with the prompt's visual segments")
            self._vision_scores[block] = dict(zip(ordered, per_frame))
        return self._vision_scores[block]

    # --- hooks ------------------------------------------------------------------------------------
    def _on_model(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = _cache_kwarg(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        self._state, self._decoding = None, None
        has_pixels = kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None
        if input_ids is None:
            if has_pixels:
                raise ValueError("ivcp needs input_ids (not inputs_embeds) to find the image tokens")
            return (args, kwargs) if self._continue(cache, past, kwargs) else None
        if input_ids.shape[0] > 1:
            raise ValueError(f"ivcp prunes batch size 1 only for now (got a batch of {input_ids.shape[0]}); "
                             "run one sample at a time")
        if past > 0:
            if has_pixels or kwargs.get("mm_encoder_outputs"):
                raise ValueError("ivcp prunes visual tokens in the first forward of a sequence only; this "
                                 "forward brings images on top of an existing KV cache")
            return (args, kwargs) if self._continue(cache, past, kwargs) else None
        if cache is not None and any(type(layer).__name__ != "DynamicLayer" for layer in cache.layers):
            raise ValueError(f"ivcp trims a DynamicCache; this cache ({type(cache).__name__}) has other layer types")
        if has_pixels:  # the tower runs inside this forward: anything captured before is stale
            self._vision_calls, self._vision_scores = [], {}
        self._state = _PrefillState(input_ids, kwargs.get("image_grid_thw"), kwargs.get("video_grid_thw"),
                                    kwargs.get("image_sizes"))
        return None

    def _continue(self, cache, past: int, kwargs) -> bool:
        """A forward on top of a pruned cache that brings no position ids gets the unpruned model's
        (transformers would derive them from the shorter cache). True if ``kwargs`` changed."""
        info = self._caches.get(cache) if cache is not None else None
        self._decoding = info
        if info is None or kwargs.get("position_ids") is not None:
            return False
        ref = kwargs.get("input_ids")
        ref = ref if ref is not None else kwargs["inputs_embeds"]
        batch, length = ref.shape[0], ref.shape[1]
        start = past + info.dropped_layer0
        pos = torch.arange(start, start + length, device=ref.device)[None, :] + info.rope_delta.to(ref.device)
        kwargs["position_ids"] = pos[None].expand(info.rows, batch, length)
        return True

    def _on_text_model(self, module, args, kwargs):
        state = self._state
        if state is None:
            return None
        pos = kwargs.get("position_ids")
        rows = self.adapter.position_rows
        if pos is None:
            pos = torch.arange(state.seq_len, device=state.input_ids.device)[None, None].expand(rows, 1, -1)
        elif pos.dim() == 2:
            pos = pos[None].expand(rows, -1, -1)
        elif pos.shape[0] == rows + 1:  # text row first, then the rotary rows
            pos = pos[1:]
        state.position_ids = pos
        state.segments = self.adapter.segments(state.input_ids[0], state.grids[0], state.grids[1], pos[:, 0],
                                               image_sizes=state.image_sizes)
        if not state.segments:  # text only: runs unpruned
            n = state.seq_len
            self.last = PrefillRecord([], torch.arange(n), 0, 0, [n] * len(self.adapter.layers), n,
                                      method=self.method.describe())
            self._state = None
            return None
        for seg in state.segments:
            state.visual[seg.start: seg.end] = True
        # features the decoder adds to visual tokens between layers (Qwen3-VL's deepstack): taken out of
        # the decoder's hands and added by the layer hooks, to the tokens still present
        state.additions = self.adapter.take_layer_additions(kwargs, len(self.adapter.layers))
        return args, kwargs

    def _add_layer_inputs(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Add a layer's residual additions (input index → feature) to the rows of the present tokens."""
        tokens, values = self._state.additions[index]
        kept = self._state.kept
        pos = torch.searchsorted(kept, tokens).clamp(max=kept.numel() - 1)
        present = kept[pos] == tokens
        hidden = hidden.clone()
        hidden[0, pos[present]] += values[present].to(hidden.dtype)
        return hidden

    def _on_layer(self, index: int, args, kwargs):
        state = self._state
        if state is None:
            mask = kwargs.get("attention_mask")
            if self._decoding is not None and isinstance(mask, torch.Tensor) and mask.dim() == 4:
                kwargs["attention_mask"] = self._decoding.layer_mask(index, mask)
                return args, kwargs
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if state.originals is None:
            if kwargs.get("position_embeddings") is None:
                raise ValueError("ivcp expects decoder layers to receive position_embeddings (cos, sin)")
            state.originals = {k: kwargs.get(k) for k in ("attention_mask", "position_embeddings", "position_ids")}
            state.cache = _cache_kwarg(kwargs)
            state.rotary = tuple(kwargs["position_embeddings"])
            state.current_positions = state.position_ids
        if index in state.additions:
            hidden = self._add_layer_inputs(index, hidden)
        if index in self.stage_layers:
            hidden = self._select(index, hidden)
        if index + 1 in self.stage_layers:
            state.hidden_inputs[index] = hidden
        state.layer_tokens[index] = state.kept
        if state.layer_kwargs is not None:
            kwargs.update(state.layer_kwargs)
        if args:
            args = (hidden,) + tuple(args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    @torch.no_grad()
    def _select(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        state = self._state
        state.hidden_inputs[layer] = hidden
        if self.sync_timing and hidden.is_cuda:
            torch.cuda.synchronize(hidden.device)
        started = time.perf_counter()
        chosen = self.method.select(SelectionContext(self, state, layer))
        chosen = torch.as_tensor(chosen, dtype=torch.long, device=state.kept.device).flatten()
        alive_visual = state.kept[state.visual[state.kept]]
        if chosen.numel() != torch.unique(chosen).numel() or not torch.isin(chosen, alive_visual).all():
            raise ValueError(f"{self.method.name} returned token indices that are not distinct present visual tokens")
        keep = ~state.visual[state.kept]  # text and markup always stay
        keep[-1] = True  # the token that generates
        keep |= torch.isin(state.kept, chosen)
        new_kept = state.kept[keep]
        local = keep.nonzero().flatten()
        for earlier in self.method.trimmed_layers(layer):  # IVC-Prune-style: earlier layers' KV cut too
            tokens = state.layer_tokens[earlier]
            if tokens.numel() == new_kept.numel():
                continue
            if state.cache is not None:
                idx = torch.searchsorted(tokens, new_kept)
                cached = state.cache.layers[earlier]
                cached.keys = cached.keys[:, :, idx]
                cached.values = cached.values[:, :, idx]
            state.layer_tokens[earlier] = new_kept
        if getattr(self.method, "position_policy", "keep") == "renumber":
            # close the gaps the dropped tokens leave: each kept token moves down by the number of
            # tokens dropped before it (1-D RoPE: positions become 0..n−1, as PDrop does)
            shift = local - torch.arange(local.numel(), device=local.device)
            positions = state.current_positions[..., local] - shift
            rotary = self.adapter.rotary_embedding(hidden, positions)
        else:
            positions = state.current_positions[..., local]
            cos, sin = state.originals["position_embeddings"]
            rotary = (cos[:, new_kept], sin[:, new_kept])
        state.kept, state.current_positions, state.rotary = new_kept, positions, rotary
        state.layer_kwargs = self._sliced(state, new_kept, rotary)
        state.stages.append({"layer": layer, "n_visual_kept": int(state.visual[new_kept].sum()),
                             "kept": new_kept.cpu()})
        if state.hidden_updates:
            hidden = hidden.clone()
            for pos, values in state.hidden_updates:
                hidden[:, pos] = values.to(hidden.dtype)
            state.hidden_updates.clear()
        if self.sync_timing and hidden.is_cuda:
            torch.cuda.synchronize(hidden.device)
        state.selection_seconds += time.perf_counter() - started
        state.hidden_inputs.pop(layer - 1, None)
        state.hidden_inputs.pop(layer, None)
        return hidden[:, local]

    @staticmethod
    def _sliced(state: _PrefillState, kept: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        mask = state.originals["attention_mask"]
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
                raise ValueError(f"ivcp cannot slice an attention mask of type {type(mask).__name__}; "
                                 "use attn_implementation 'sdpa', 'eager' or 'flash_attention_2'")
            if mask.shape[-1] != state.seq_len or mask.shape[-2] != state.seq_len:
                raise ValueError(f"unexpected attention mask shape {tuple(mask.shape)} for a prompt of "
                                 f"{state.seq_len} tokens")
            mask = mask[:, :, kept][:, :, :, kept]
        # position_ids only tell flash-attention where packed sequences start: the kept tokens are
        # one sequence, so none are passed (sliced ids would look like many packed sequences).
        return {"attention_mask": mask, "position_embeddings": rotary, "position_ids": None}

    def _after_model(self, module, args, kwargs, output):
        state, self._state, self._decoding = self._state, None, None
        if state is None:
            return None
        self._vision_calls, self._vision_scores = [], {}
        n_layers = len(self.adapter.layers)
        cache = getattr(output, "cache", None)
        cache = cache if cache is not None else getattr(output, "past_key_values", None)
        if cache is not None and len(cache.layers) == n_layers:
            kv_lengths = [int(layer.keys.shape[-2]) for layer in cache.layers]
        else:
            kv_lengths = [int(state.layer_tokens[i].numel()) for i in range(n_layers)]
        visual_per_layer = [int(state.visual[state.layer_tokens[i]].sum()) for i in range(n_layers)]
        marks = {name: torch.unique(torch.cat(parts)).cpu() for name, parts in state.marks.items()}
        self.last = PrefillRecord(
            segments=[(s.start, s.end) for s in state.segments],
            kept=state.kept.cpu(),
            n_visual=int(state.visual.sum()),
            n_visual_kept=int(state.visual[state.kept].sum()),
            kv_lengths=kv_lengths,
            seq_len=state.seq_len,
            stages=state.stages,
            marks=marks,
            visual_kv_per_layer=visual_per_layer,
            selection_seconds=state.selection_seconds,
            method=self.method.describe(),
        )
        if cache is not None and any(length != state.seq_len for length in kv_lengths):
            pos = state.position_ids
            delta = pos.amax(dim=(0, 2)).view(-1, 1) + 1 - state.seq_len
            first = state.layer_tokens[0]
            columns = [None if tokens.numel() == first.numel() else torch.searchsorted(first, tokens)
                       for tokens in (state.layer_tokens[i] for i in range(n_layers))]
            self._caches[cache] = _CacheInfo(state.seq_len - kv_lengths[0], delta, pos.shape[0], first.numel(),
                                             columns)
        return None


def resolve_method(model: nn.Module, method: str | PruningMethod, **params: Any) -> PruningMethod:
    """The method object ``prune`` would use on ``model``: defaults from configs/, then validated."""
    adapter = adapter_for(model)
    method_obj = make_method(method, **params)
    text_config = getattr(model.config, "text_config", model.config)
    method_obj = method_obj.resolve(lambda name: _config.method_defaults(
        adapter.family, name, text_config.num_hidden_layers, text_config.hidden_size))
    method_obj.validate(len(adapter.layers))
    return method_obj


@contextlib.contextmanager
def prune(model: nn.Module, method: str | PruningMethod, *, sync_timing: bool = False,
          **params: Any) -> Iterator[PruneSession]:
    """Run ``model`` pruned by ``method`` inside the block; yields a :class:`PruneSession`.

    ``method`` is a registered name (``ivcp.available_methods()``) with ``params``, or a method
    object. Bad configuration raises ValueError before anything runs. Batch size 1.
    ``sync_timing`` synchronises CUDA around the selection so ``selection_seconds`` is exact (the
    benchmark sets it; it costs two synchronisations per prefill).
    """
    method_obj = resolve_method(model, method, **params)
    attn = getattr(model.config, "_attn_implementation", None)
    if attn not in (None, "sdpa", "eager", "flash_attention_2", "flash_attention_3"):
        raise ValueError(f"ivcp supports the sdpa, eager and flash-attention implementations, not {attn!r}")
    if model in _ACTIVE:
        raise ValueError("this model is already inside an ivcp.prune block")
    session = PruneSession(model, method_obj, adapter_for(model), sync_timing=sync_timing)
    session.attach()
    _ACTIVE.add(model)
    try:
        yield session
    finally:
        session.detach()
        _ACTIVE.discard(model)

