"""The pruning engine: hooks on an unmodified Hugging Face model.

``with ivcp.prune(model, "ivc_prune") as session:`` registers forward pre-hooks on the multimodal
model, the decoder stack and every decoder layer; plain ``model(**inputs)`` and
``model.generate(**inputs)`` then run pruned. Per prefill that holds visual tokens:

1. the multimodal model's hook finds the visual segments of every batch row (each image, each video frame);
2. the decoder stack's hook records the rotary position ids of every token (original positions);
3. before each selection layer K the method picks, row by row, the visual tokens to keep from signals of
   layers K−1 / K (value vectors, attention rows computed from q and the cached keys, never an attention
   matrix); the engine gathers the hidden states, rotary cos/sin and mask for layers ≥ K to each row's
   kept tokens (rows left-padded to the longest, the padding masked: :mod:`ivcp.layout`) and, for
   methods that ask for it, cuts the KV cache of layers < K to the same tokens;
4. decoding continues at the positions the unpruned model would use, each row from its own last one,
   with every layer's decode mask cut to the entries its cache holds. The returned cache says the length
   of the unpruned sequence it stands for, so any later call inside the block (more tokens, new text, a
   chat turn with a new picture, which runs unpruned) continues it exactly; outside the block it is refused.

On exit all hooks are removed; the model's parameters and buffers are never modified.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from . import config as _config
from .compat import cache_kwarg, output_cache
from .adapters import ModelAdapter, Segment, adapter_for
from .layout import TokenLayout, causal_mask, decode_mask, gather_columns, hide_padding, masked_value
from .methods import PruningMethod, make_method
from .selection import SelectionContext

_ACTIVE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@dataclass
class PrefillRecord:
    """What the engine did to one row of the last prefill. Token indices are positions in that row of
    ``input_ids`` (a left-padded batch's pad tokens count: ``padding`` of them come first)."""

    segments: list[tuple[int, int]]  # (start, end) of each segment's span
    kept: torch.Tensor  # sorted input indices seen by layers ≥ the last selection layer (the row's pads excluded)
    n_visual: int
    n_visual_kept: int
    kv_lengths: list[int]  # the row's KV-cache entries in every layer after prefill (padding excluded)
    seq_len: int
    stages: list[dict[str, Any]] = field(default_factory=list)  # per selection: layer, n_visual_kept, kept
    marks: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. "ivc", "seed": input indices
    visual_kv_per_layer: list[int] = field(default_factory=list)  # visual tokens in each layer's KV
    selection_seconds: float = 0.0
    method: dict[str, Any] = field(default_factory=dict)
    padding: int = 0  # pad tokens of this row in the batch's input_ids
    strides: list[tuple[int, int] | None] = field(default_factory=list)  # per segment: (grid_w, row_stride) if strided

    @property
    def visual_kv_share(self) -> float:
        """Share of the visual KV entries kept, over all layers ("Average Tokens" in the paper)."""
        if not self.n_visual or not self.visual_kv_per_layer:
            return 1.0
        return sum(self.visual_kv_per_layer) / (self.n_visual * len(self.visual_kv_per_layer))

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only (index tensors as lists), ready for ``json.dumps``."""
        return {"segments": [list(s) for s in self.segments], "kept": self.kept.tolist(), "n_visual": self.n_visual,
                "n_visual_kept": self.n_visual_kept, "kv_lengths": list(self.kv_lengths), "seq_len": self.seq_len,
                "padding": self.padding, "visual_kv_share": self.visual_kv_share,
                "stages": [{k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                           for st in self.stages],
                "marks": {k: v.tolist() for k, v in self.marks.items()},
                "visual_kv_per_layer": list(self.visual_kv_per_layer), "selection_seconds": self.selection_seconds,
                "method": _plain(self.method)}

    def __repr__(self) -> str:
        stages = ", ".join(f"layer {st['layer']}: {st['n_visual_kept']}" for st in self.stages)
        marks = ", ".join(f"{k}: {v.numel()}" for k, v in self.marks.items())
        return (f"PrefillRecord(visual {self.n_visual_kept}/{self.n_visual} kept in {len(self.segments)} segments, "
                f"{self.kept.numel()} of {self.seq_len - self.padding} tokens after the last stage, "
                f"stages [{stages}], kv_lengths {self.kv_lengths}, visual_kv_share {self.visual_kv_share:.3f}"
                + (f", padding {self.padding}" if self.padding else "") + (f", marks {{{marks}}}" if marks else "") + ")")


class BatchRecord(Sequence[PrefillRecord]):
    """The last prefill: one :class:`PrefillRecord` per batch row (``session.last[b]``). With a batch of one,
    the row's fields read directly (``session.last.kept``); with more rows, ask a row."""

    def __init__(self, rows: list[PrefillRecord], cache_lengths: list[int], selection_seconds: float,
                 method: dict[str, Any]):
        self.rows = rows
        self.cache_lengths = cache_lengths  # each layer's KV length as stored (rows padded to the longest)
        self.selection_seconds = selection_seconds  # the whole batch's selection, engine mechanics included
        self.method = method

    def __getitem__(self, index):
        return self.rows[index]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def visual_kv_share(self) -> float:
        """Share of the batch's visual KV entries kept, over all rows and layers."""
        total = sum(r.n_visual * len(r.visual_kv_per_layer) for r in self.rows)
        return sum(sum(r.visual_kv_per_layer) for r in self.rows) / total if total else 1.0

    def __getattr__(self, name: str):
        if name.startswith("_") or name == "rows":
            raise AttributeError(name)
        if len(self.rows) == 1:
            return getattr(self.rows[0], name)
        if hasattr(PrefillRecord, name) or name in PrefillRecord.__dataclass_fields__:
            raise AttributeError(f"the last prefill had {len(self.rows)} rows: read {name} of one row, "
                                 f"session.last[b].{name}")
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only, ready for ``json.dumps``: the batch's fields and one dict per row."""
        return {"batch_size": self.batch_size, "cache_lengths": list(self.cache_lengths),
                "visual_kv_share": self.visual_kv_share, "selection_seconds": self.selection_seconds,
                "method": _plain(self.method), "rows": [r.to_dict() for r in self.rows]}

    def __repr__(self) -> str:
        name = self.method.get("method", "?") if isinstance(self.method, dict) else self.method
        rows = "".join(f"\n  [{b}] {r!r}" for b, r in enumerate(self.rows))
        return (f"BatchRecord({name}, {self.batch_size} row{'s' if self.batch_size != 1 else ''}, "
                f"cache_lengths {self.cache_lengths}, visual_kv_share {self.visual_kv_share:.3f}:{rows})")


def _plain(value: Any) -> Any:
    """``value`` with tensors and tuples turned into lists (for JSON)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass
class _CacheInfo:
    """Kept with a pruned KV cache so decoding sees each layer's entries right and uses the unpruned
    model's positions. Decoding builds its mask for layer 0's entries; the other layers take their columns."""

    seq_len: int  # the batch's prompt length
    rope_delta: torch.Tensor  # (B, 1): after the prompt, position of token i is i + delta
    rows: int  # rows of rotary position ids
    layouts: list[TokenLayout]  # per layer: the prompt tokens its cache holds
    columns: list[torch.Tensor | None]  # per layer: their columns in layer 0's layout (None: the same layout)
    attn_implementation: str | None
    # (layers, B): how far below the unpruned ids each layer numbered the prompt's last token (a method that
    # renumbers positions, e.g. PDrop's): decode tokens at that layer move down as far. None: nothing moved.
    shifts: torch.Tensor | None = None
    model: "weakref.ReferenceType[nn.Module] | None" = None  # the model whose ivcp.prune block may continue it

    @property
    def n_layer0(self) -> int:
        return self.layouts[0].width

    def length(self, stored: int) -> int:
        """The unpruned sequence length a cache whose layer 0 stores ``stored`` entries stands for."""
        return stored + self.seq_len - self.n_layer0

    def layer_mask(self, layer: int, mask, generated: int, queries: int, dtype: torch.dtype):
        """The decode mask of ``layer``, whose cache holds its prompt entries then ``generated`` decode
        entries, for ``queries`` new tokens, from the model's mask for layer 0's cache (None: plain causal)."""
        cols, layout = self.columns[layer], self.layouts[layer]
        if cols is None:
            return mask
        if mask is None:
            if not layout.padded:
                return None
            return decode_mask(layout.valid, generated, queries, self.attn_implementation, dtype)
        if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 4):
            raise ValueError(f"ivcp cannot cut a decode mask of type {type(mask).__name__} to a pruned cache")
        n0 = self.n_layer0
        cols = cols.to(mask.device)
        prompt = gather_columns(mask[..., :n0], cols, mask.dim() - 1)
        if layout.padded:
            valid = layout.valid.to(mask.device)
            prompt = prompt & valid if mask.dim() == 2 else torch.where(valid[:, None, None, :], prompt,
                                                                         masked_value(mask))
        rest = mask[..., n0:]
        if rest.shape[0] != prompt.shape[0]:
            rest = rest.expand(prompt.shape[0], *rest.shape[1:])
        return torch.cat([prompt, rest], dim=-1)

    def prompt_mask(self, mask, past: int, queries: int):
        """The 2-D padding mask the model should build layer 0's decode mask from: ``mask`` (B, prompt +
        generated + queries, in the unpruned sequence's columns, or None) cut to layer 0's cache."""
        layout = self.layouts[0]
        generated = past - layout.width
        if mask is None:
            if not layout.padded:
                return None
            return torch.cat([layout.valid, torch.ones(layout.batch, generated + queries, dtype=torch.bool,
                                                       device=layout.valid.device)], dim=1)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError(f"ivcp decodes on a pruned cache with a 2-D attention mask (or none), not "
                             f"{type(mask).__name__} of {getattr(mask, 'dim', lambda: '?')()} dimensions")
        expected = self.seq_len + generated + queries
        if mask.shape[1] != expected:
            raise ValueError(f"the attention mask covers {mask.shape[1]} tokens; on this pruned cache it must cover "
                             f"the unpruned sequence: {self.seq_len} prompt + {generated} generated + {queries} new "
                             f"= {expected}")
        tokens, valid = layout.tokens.to(mask.device), layout.valid.to(mask.device)
        prompt = mask[:, : self.seq_len].bool().gather(1, tokens) & valid
        return torch.cat([prompt, mask[:, self.seq_len:].bool()], dim=1).to(mask.dtype)


def _stored_length(cache, layer: int = 0) -> int:
    """Entries a cache layer really stores (a pruned cache's ``get_seq_length`` says the unpruned length)."""
    if cache is None or len(cache.layers) <= layer:
        return 0
    keys = getattr(cache.layers[layer], "keys", None)
    return 0 if keys is None or keys.numel() == 0 else int(keys.shape[-2])


class _PrunedCache:
    """Mixed into a KV cache the engine pruned (its class is swapped for ``Pruned<Class>``): it says the
    length of the unpruned sequence it stands for (``generate`` and the models slice the new input and
    number positions by it), and refuses to be used outside an ``ivcp.prune`` block on its model, where
    nothing would cut each layer's mask to the entries it holds."""

    _ivcp: _CacheInfo

    def _ivcp_check(self) -> _CacheInfo:
        info = self._ivcp
        model = info.model() if info.model is not None else None
        if model is None or model not in _ACTIVE:
            raise ValueError("this KV cache was pruned by ivcp (its layers hold different tokens): continue "
                             "generating from it inside an `ivcp.prune` block on the same model")
        return info

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._ivcp_check().length(_stored_length(self, 0))

    def get_query_offset(self, layer_idx: int = 0) -> int:  # the masks index the stored entries
        self._ivcp_check()
        return _stored_length(self, layer_idx)

    def update(self, *args, **kwargs):
        self._ivcp_check()
        return super().update(*args, **kwargs)

    def crop(self, max_length: int) -> None:
        raise ValueError("ivcp cannot crop a pruned KV cache (its layers hold different tokens)")


_PRUNED_CLASSES: dict[type, type] = {}


def _mark_pruned(cache, info: _CacheInfo) -> None:
    """Make ``cache`` a pruned cache described by ``info`` (its class becomes a subclass of its own)."""
    cls = type(cache)
    if not isinstance(cache, _PrunedCache):
        if cls not in _PRUNED_CLASSES:
            _PRUNED_CLASSES[cls] = type(f"Pruned{cls.__name__}", (_PrunedCache, cls), {"__module__": __name__})
        cache.__class__ = _PRUNED_CLASSES[cls]
    cache._ivcp = info


class _PrefillState:
    def __init__(self, input_ids: torch.Tensor, image_grid_thw, video_grid_thw, image_sizes=None,
                 padding: torch.Tensor | None = None):
        self.input_ids = input_ids  # (B, S)
        self.grids = (image_grid_thw, video_grid_thw)
        self.image_sizes = image_sizes
        self.batch, self.seq_len = input_ids.shape
        device = input_ids.device
        self.padding = padding  # (B, S) True on the batch's pad tokens, or None
        self.segments: list[list[Segment]] = [[] for _ in range(self.batch)]  # per row
        self.visual = torch.zeros(self.batch, self.seq_len, dtype=torch.bool, device=device)
        self.layout = TokenLayout.full(self.batch, self.seq_len, padding, device)  # what the current layers hold
        self.initial_layout = self.layout
        self.last_tokens = (self.seq_len - 1 - torch.flip(self.layout.valid, [1]).long().argmax(1)).tolist()
        self.position_ids: torch.Tensor | None = None  # (rows, B, S)
        self.originals: dict[str, Any] | None = None  # layer kwargs of the full sequence
        self.layer_kwargs: dict[str, Any] | None = None  # the same, for the current layout
        self.layer_layouts: dict[int, TokenLayout] = {}  # the tokens each layer processed / caches
        self.hidden_inputs: dict[int, torch.Tensor] = {}
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin of the current layout
        self.current_positions: torch.Tensor | None = None  # rotary ids the current layers use (rows, B, L)
        self.current_shift: torch.Tensor | None = None  # (B,) original − current id of each row's last token
        self.layer_shifts: dict[int, torch.Tensor] = {}  # layer → current_shift when it ran (renumbering only)
        self.hidden_updates: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (row, columns, values)
        # layer → ((T, 2) [row, input index], (T, hidden) features) added to that layer's input
        self.additions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cache = None
        self.marks: list[dict[str, list[torch.Tensor]]] = [{} for _ in range(self.batch)]
        self.stages: list[list[dict[str, Any]]] = [[] for _ in range(self.batch)]
        self.row_seconds = [0.0] * self.batch
        self.selection_seconds = 0.0


class HookContext(SelectionContext):
    """The selection context of the Hugging Face hooks: one batch row of the prefill in flight, its signals
    read from the layers' inputs and the KV cache the model is filling."""

    def __init__(self, session: "PruneSession", state: _PrefillState, layer: int, row: int = 0):
        self._session, self._state = session, state
        adapter = session.adapter
        super().__init__(
            layer=layer, stage=session.stage_layers.index(layer), rope=adapter.rope, input_ids=state.input_ids[row],
            segments=state.segments[row], visual=state.visual[row], alive=state.layout.row(row),
            position_ids=state.position_ids[:, row], last_token=state.last_tokens[row],
            marker_token_ids=adapter.marker_token_ids, turn_end_token_ids=adapter.turn_end_token_ids,
            valid=state.initial_layout.valid[row], marks=state.marks[row], row=row,
            attention_scale=lambda index: adapter.attention_scale(adapter.layers[index]))

    def update_hidden(self, tokens, values: torch.Tensor) -> None:
        self._state.hidden_updates.append((self.row, self._columns(tokens), values))

    def _columns(self, tokens) -> torch.Tensor:
        """Columns of the current layers' tensors (hidden states, rotary, layer K−1's cache) holding ``tokens``."""
        tokens = self._tokens(tokens)
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self._state.seq_len):
            raise ValueError(f"asked for signals of tokens outside the prompt (0..{self._state.seq_len - 1})")
        cols = self._state.layout.columns()[self.row, tokens]
        if cols.numel() and bool((cols < 0).any()):
            raise ValueError("asked for signals of tokens that were already pruned")
        return cols

    def _check_present(self, tokens) -> torch.Tensor:
        self._columns(tokens)
        return self._tokens(tokens)

    def _row_of(self, x: torch.Tensor) -> torch.Tensor:
        """This row of a batch-first tensor (a broadcast batch of one serves every row)."""
        return x[self.row: self.row + 1] if x.shape[0] > 1 else x

    def _projection(self, which: str, layer: int, tokens, norm: bool = True, rotary: bool = True) -> torch.Tensor:
        adapter = self._session.adapter
        module = adapter.layers[layer]
        cols = self._columns(tokens)
        hidden = self._state.hidden_inputs[layer][self.row: self.row + 1, cols]
        if norm:
            hidden = adapter.input_norm(module)(hidden)
        out = adapter.project_heads(adapter.attention(module), which, hidden)
        if rotary and which != "v":
            cos, sin = (self._row_of(x)[:, cols] for x in self._state.rotary)
            out = adapter.rotate(out, cos.to(out.dtype), sin.to(out.dtype))
        return out

    def _cached(self, which: str, layer: int, tokens) -> torch.Tensor | None:
        cache = self._state.cache
        if (cache is None or layer != self.layer - 1 or len(cache.layers) <= layer
                or not self._session.adapter.cache_holds_heads):  # e.g. MLA caches hold no per-head k/v
            return None
        entries = cache.layers[layer].keys if which == "k" else cache.layers[layer].values
        return entries[self.row: self.row + 1, :, self._columns(tokens)]

    @torch.no_grad()
    def hidden_states(self, tokens) -> torch.Tensor:
        return self._state.hidden_inputs[self.layer][self.row: self.row + 1, self._columns(tokens)]

    @property
    def vision_local_block(self) -> int:
        return self._session.adapter.vision_local_block

    @property
    def vision_global_block(self) -> int:
        return self._session.adapter.vision_global_block

    @property
    def vision_depth(self) -> int:
        return self._session.adapter.vision_depth

    @torch.no_grad()
    def vision_attention(self, segment: Segment, block: int, signal: str = "received") -> torch.Tensor:
        """Attention the segment's tokens receive in vision block ``block`` (mean over heads and
        queries, pooled over each merge group), (N,) in the segment's raster order; ``signal="cls"``: the
        CLS token's attention row instead (towers with a CLS token)."""
        return self._session.vision_attention(self._state.segments, block, signal)[(self.row, segment)]


class PruneSession:
    """The hooks of one ``ivcp.prune`` block; ``last`` describes the last prefill (a :class:`BatchRecord`),
    ``records`` every prefill of the block in order."""

    def __init__(self, model: nn.Module, method: PruningMethod, adapter: ModelAdapter, sync_timing: bool = False):
        self.model, self.method, self.adapter = model, method, adapter
        self.sync_timing = sync_timing  # synchronise CUDA around the selection so its time is real
        self.stage_layers = method.selection_layers()
        self.last: BatchRecord | None = None
        self.records: list[BatchRecord] = []  # every prefill of the block, in order (``last`` is the latest)
        self._last_layout: TokenLayout | None = None  # the tokens the last prefill's logits stand for
        self._labels: torch.Tensor | None = None
        self._state: _PrefillState | None = None
        self._decoding: _CacheInfo | None = None  # set during a forward on a pruned cache
        self._decode_positions: torch.Tensor | None = None  # (rows, B, T) unpruned ids of a forward on it
        self._takes_cache_position = "cache_position" in inspect.signature(adapter.multimodal_model.forward).parameters
        self._handles: list[Any] = []
        self._vision_blocks = method.vision_blocks(adapter)
        self._vision_calls: list[dict] = []  # per vision-tower call: grid_thw and block inputs
        self._vision_scores: dict[tuple[int, str], dict[tuple[int, Segment], torch.Tensor]] = {}

    # --- lifecycle ----------------------------------------------------------------------------
    def attach(self) -> None:
        a = self.adapter
        self._handles.append(a.multimodal_model.register_forward_pre_hook(self._on_model, with_kwargs=True))
        self._handles.append(a.multimodal_model.register_forward_hook(self._after_model, with_kwargs=True))
        if self.model is not a.multimodal_model:  # labels: the loss over the positions the logits stand for
            self._handles.append(self.model.register_forward_pre_hook(self._take_labels, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._loss, with_kwargs=True))
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

        def option(name):
            value = kwargs.get(name)
            return value if value is not None else getattr(config, name, None) if config is not None else None

        if option("assistant_model") is not None or option("prompt_lookup_num_tokens") or option("assistant_early_exit"):
            raise ValueError("ivcp does not support assisted or prompt-lookup decoding (assistant_model, "
                             "prompt_lookup_num_tokens, assistant_early_exit): checking drafted tokens crops the KV "
                             "cache, whose layers hold different tokens once pruned; use greedy or sampling decoding")
        if option("prefill_chunk_size"):
            raise ValueError("ivcp chooses the visual tokens from the whole prompt in one prefill: "
                             "prefill_chunk_size is not supported")
        if option("use_cache") is False:
            raise ValueError("ivcp generates with the KV cache: with use_cache=False every step would be a new "
                             "prefill that chooses the visual tokens again from the grown text; drop use_cache=False")
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

    def vision_attention(self, segments: list[list[Segment]], block: int,
                         signal: str = "received") -> dict[tuple[int, Segment], torch.Tensor]:
        """Received attention of vision block ``block`` per (batch row, segment). The tower encodes the
        batch's images (row by row, each row's in prompt order) before its videos (likewise), one call each."""
        if (block, signal) not in self._vision_scores:
            scores = self.adapter.cls_attention if signal == "cls" else self.adapter.received_attention
            per_frame: list[torch.Tensor] = []
            for call in self._vision_calls:
                if block not in call["blocks"]:
                    raise ValueError(f"vision block {block} did not run for this prompt")
                per_frame += scores(call, call["blocks"][block])
            pairs = [(row, seg) for row, segs in enumerate(segments) for seg in segs]
            ordered = sorted(pairs, key=lambda p: (p[1].kind != "image", p[0], p[1].source, p[1].frame, p[1].part))
            if [t.numel() for t in per_frame] != [seg.n for _, seg in ordered]:
                raise ValueError("the vision tower's outputs do not line up with the prompt's visual segments")
            self._vision_scores[block, signal] = dict(zip(ordered, per_frame))
        return self._vision_scores[block, signal]

    # --- hooks ------------------------------------------------------------------------------------
    def _on_model(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = cache_kwarg(kwargs)
        past = _stored_length(cache)
        self._state, self._decoding = None, None
        has_pixels = kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None
        if past > 0:  # a continuation: images it brings (a later chat turn) run unpruned on top of the cache
            return (args, kwargs) if self._continue(cache, past, kwargs) else None
        if input_ids is None:
            raise ValueError("ivcp needs input_ids to find the image tokens: pass input_ids (with the pixels), "
                             "not inputs_embeds (image features merged into embeddings cannot be pruned)")
        if cache is not None and any(type(layer).__name__ != "DynamicLayer" for layer in cache.layers):
            raise ValueError(f"ivcp trims a DynamicCache; this cache ({type(cache).__name__}) has other layer types")
        if has_pixels:  # the tower runs inside this forward: anything captured before is stale
            self._vision_calls, self._vision_scores = [], {}
        mask = kwargs.get("attention_mask")
        padding = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            if mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
            padding = ~mask.to(torch.bool)
            if not bool(padding.any()):
                padding = None
            elif bool(padding.all(dim=1).any()):
                raise ValueError("a row of the batch is all padding (its attention_mask is all zeros)")
            elif bool((padding[:, 1:] & ~padding[:, :-1]).any()):
                rows = torch.nonzero((padding[:, 1:] & ~padding[:, :-1]).any(1)).flatten().tolist()
                raise ValueError(f"rows {rows} of the batch have padding after real tokens: ivcp needs left padding "
                                 "(processor.tokenizer.padding_side = \"left\", or padding_side=\"left\" in "
                                 "ivcp.collate)")
        self._state = _PrefillState(input_ids, kwargs.get("image_grid_thw"), kwargs.get("video_grid_thw"),
                                    self.adapter.layout_inputs(kwargs), padding)
        if padding is not None and kwargs.get("position_ids") is None and self.adapter.position_rows == 1:
            # 1-D RoPE numbers a padded row from its first pad when no ids are given: the unpruned model does not
            # mind (RoPE is relative), but methods that read absolute positions (IVC) would choose differently
            # than for the row alone. Number each row from its first real token, as generate() does.
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(padding, 1)
            return args, kwargs
        return None

    def _continue(self, cache, past: int, kwargs) -> bool:
        """A forward on top of a pruned cache (layer 0 stores ``past`` entries): the mask is cut to layer 0's
        entries, and a forward that brings no position ids gets the unpruned model's. True if ``kwargs`` changed."""
        info = getattr(cache, "_ivcp", None)
        self._decoding = info
        if info is None:
            return False
        ref = kwargs.get("input_ids")
        ref = ref if ref is not None else kwargs["inputs_embeds"]
        batch, length = ref.shape[0], ref.shape[1]
        if batch != info.layouts[0].batch:
            raise ValueError(f"this pruned cache holds {info.layouts[0].batch} rows; the forward brings {batch}")
        kwargs["attention_mask"] = info.prompt_mask(kwargs.get("attention_mask"), past, length)
        start = info.length(past)  # the new tokens' index in the unpruned sequence
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(start, start + length, device=ref.device)[None, :] + info.rope_delta.to(ref.device)
            # 1-D RoPE takes (B, T) ids; M-RoPE (rows, B, T)
            pos = pos.expand(batch, length) if info.rows == 1 else pos[None].expand(info.rows, batch, length)
            kwargs["position_ids"] = pos
        # where decoding goes on after these tokens (a later turn's image moves M-RoPE positions on)
        rows = pos if pos.dim() == 3 else pos[None]
        if rows.shape[0] == info.rows + 1:  # text row first, then the rotary rows
            rows = rows[1:]
        info.rope_delta = rows[..., -1].amax(0).view(-1, 1).to(info.rope_delta.device) + 1 - (start + length)
        if self._takes_cache_position:  # transformers < 5.25 numbers the masks' queries by cache_position
            kwargs["cache_position"] = torch.arange(past, past + length, device=ref.device)
        return True

    def _on_text_model(self, module, args, kwargs):
        state = self._state
        if state is None:
            if self._decoding is not None and self._decoding.shifts is not None:
                pos = kwargs.get("position_ids")
                if pos is None:
                    raise ValueError("ivcp decodes a cache with renumbered positions from the position ids the "
                                     "model passes its decoder stack; this forward passed none")
                rows = self.adapter.position_rows
                pos = pos[None] if pos.dim() == 2 else pos[1:] if pos.shape[0] == rows + 1 else pos
                self._decode_positions = pos.expand(rows, *pos.shape[1:])
            return None
        pos = kwargs.get("position_ids")
        rows = self.adapter.position_rows
        if pos is None:
            pos = torch.arange(state.seq_len, device=state.input_ids.device)[None, None].expand(rows, 1, -1)
        elif pos.dim() == 2:
            pos = pos[None].expand(rows, -1, -1)
        elif pos.shape[0] == rows + 1:  # text row first, then the rotary rows
            pos = pos[1:]
        state.position_ids = pos.expand(rows, state.batch, state.seq_len)
        state.segments = self.adapter.batch_segments(state.input_ids, state.grids[0], state.grids[1],
                                                     state.position_ids, image_sizes=state.image_sizes)
        if not any(state.segments):  # text only: runs unpruned
            state.layer_layouts = {i: state.layout for i in range(len(self.adapter.layers))}
            self._store(self._record(state, cache=None), state.layout)
            self._state = None
            return None
        for row, segments in enumerate(state.segments):
            for seg in segments:
                state.visual[row, seg.indices(state.visual.device)] = True
        # features the decoder adds to visual tokens between layers (Qwen3-VL's deepstack): taken out of
        # the decoder's hands and added by the layer hooks, to the tokens still present
        state.additions = self.adapter.take_layer_additions(kwargs, len(self.adapter.layers))
        return args, kwargs

    def _add_layer_inputs(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Add a layer's residual additions ([row, input index] → feature) to the present tokens."""
        where, values = self._state.additions[index]
        cols = self._state.layout.columns()[where[:, 0], where[:, 1]]
        present = cols >= 0
        hidden = hidden.clone()
        hidden[where[present, 0], cols[present]] += values[present].to(hidden.dtype)
        return hidden

    def _on_layer(self, index: int, args, kwargs):
        state = self._state
        hidden = args[0] if args else kwargs["hidden_states"]
        if state is None:
            if self._decoding is not None:
                cache = cache_kwarg(kwargs)
                cached = cache.layers[index].keys.shape[-2] if cache is not None and len(cache.layers) > index else 0
                generated = cached - self._decoding.layouts[index].width
                kwargs["attention_mask"] = self._decoding.layer_mask(index, kwargs.get("attention_mask"), generated,
                                                                     hidden.shape[1], hidden.dtype)
                shifts = self._decoding.shifts
                if shifts is not None and bool(shifts[index].any()):  # this layer numbered the prompt lower
                    pos = self._decode_positions - shifts[index].to(self._decode_positions.device).view(1, -1, 1)
                    kwargs["position_embeddings"] = self.adapter.join_position_embeddings(
                        self.adapter.rotary_embedding(hidden, pos))
                return args, kwargs
            return None
        if state.originals is None:
            if kwargs.get("position_embeddings") is None:
                raise ValueError("ivcp expects decoder layers to receive position_embeddings (cos, sin)")
            state.originals = {k: kwargs.get(k) for k in ("attention_mask", "position_embeddings", "position_ids")}
            state.cache = cache_kwarg(kwargs)
            state.rotary = self.adapter.split_position_embeddings(kwargs["position_embeddings"])
            state.current_positions = state.position_ids
        if index in state.additions:
            hidden = self._add_layer_inputs(index, hidden)
        if index in self.stage_layers:
            hidden = self._select(index, hidden)
        if index + 1 in self.stage_layers:
            state.hidden_inputs[index] = hidden
        state.layer_layouts[index] = state.layout
        if state.current_shift is not None:
            state.layer_shifts[index] = state.current_shift
        if state.layer_kwargs is not None:
            kwargs.update(state.layer_kwargs)
        if args:
            args = (hidden,) + tuple(args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _choose(self, state: _PrefillState, layer: int, row: int) -> torch.Tensor:
        """The sorted input indices row ``row`` keeps from the selection at ``layer``: its text and markup, its
        last token, and the visual tokens the method chose."""
        alive = state.layout.row(row)
        if not state.segments[row]:
            return alive
        started = time.perf_counter()
        chosen = self.method.select(HookContext(self, state, layer, row))
        state.row_seconds[row] += time.perf_counter() - started
        chosen = torch.as_tensor(chosen, dtype=torch.long, device=alive.device).flatten()
        alive_visual = alive[state.visual[row, alive]]
        if chosen.numel() != torch.unique(chosen).numel() or not torch.isin(chosen, alive_visual).all():
            raise ValueError(f"{self.method.name} returned token indices that are not distinct present visual tokens")
        keep = ~state.visual[row, alive]  # text and markup always stay
        keep[-1] = True  # the token that generates
        keep |= torch.isin(alive, chosen)
        return alive[keep]

    @torch.no_grad()
    def _select(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        state = self._state
        state.hidden_inputs[layer] = hidden
        if self.sync_timing and hidden.is_cuda:
            torch.cuda.synchronize(hidden.device)
        started = time.perf_counter()
        old = state.layout
        new = TokenLayout.pack([self._choose(state, layer, row) for row in range(state.batch)], state.seq_len)
        local = old.columns_of(new)  # (B, L_new): where each new column's token sits now
        for earlier in self.method.trimmed_layers(layer):  # IVC-Prune-style: earlier layers' KV cut too
            held = state.layer_layouts[earlier]
            if held.same_as(new):
                continue
            if state.cache is not None:
                index = held.columns_of(new)
                cached = state.cache.layers[earlier]
                cached.keys = gather_columns(cached.keys, index, 2)
                cached.values = gather_columns(cached.values, index, 2)
            state.layer_layouts[earlier] = new
        if getattr(self.method, "position_policy", "keep") == "renumber":
            # close the gaps the dropped tokens leave: each kept token moves down by the number of
            # the row's tokens dropped before it (1-D RoPE: positions become 0..n−1, as PDrop does)
            shift = old.ranks().gather(1, local) - new.ranks()
            positions = gather_columns(state.current_positions.transpose(0, 1), local, 2).transpose(0, 1)
            positions = positions - torch.where(new.valid, shift, 0)[None]
            rotary = self.adapter.rotary_embedding(hidden, positions)
            # the last column holds each row's last prompt token (rows are left-padded)
            last = torch.tensor(state.last_tokens, device=positions.device)
            original = state.position_ids[0].gather(1, last[:, None])[:, 0]
            state.current_shift = original - positions[0, :, -1]
        else:
            positions = gather_columns(state.current_positions.transpose(0, 1), local, 2).transpose(0, 1)
            parts = self.adapter.split_position_embeddings(state.originals["position_embeddings"])
            rotary = tuple(gather_columns(part, new.tokens, 1) for part in parts)
        state.layout, state.current_positions, state.rotary = new, positions, rotary
        state.layer_kwargs = self._sliced(state, new, rotary)
        for row in range(state.batch):
            if not state.segments[row]:  # nothing to select in a row without visual tokens
                continue
            kept = new.row(row)
            state.stages[row].append({"layer": layer, "n_visual_kept": int(state.visual[row, kept].sum()),
                                      "kept": kept.cpu()})
        if state.hidden_updates:
            hidden = hidden.clone()
            for row, cols, values in state.hidden_updates:
                hidden[row, cols] = values[0].to(hidden.dtype)
            state.hidden_updates.clear()
        hidden = gather_columns(hidden, local, 1)
        if self.sync_timing and hidden.is_cuda:
            torch.cuda.synchronize(hidden.device)
        state.selection_seconds += time.perf_counter() - started
        state.hidden_inputs.pop(layer - 1, None)
        state.hidden_inputs.pop(layer, None)
        return hidden

    def _sliced(self, state: _PrefillState, layout: TokenLayout, rotary: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        """The layer kwargs for ``layout``: the prefill mask cut to its tokens (padding hidden), its rotary."""
        mask = state.originals["attention_mask"]
        if mask is None:
            if layout.padded:
                mask = causal_mask(layout.valid, self.adapter.attn_implementation,
                                   rotary[0].dtype)
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2:  # flash-attention's padding mask
            if mask.shape[-1] != state.seq_len:
                raise ValueError(f"unexpected attention mask shape {tuple(mask.shape)} for a prompt of "
                                 f"{state.seq_len} tokens")
            mask = gather_columns(mask.bool(), layout.tokens, 1) & layout.valid
        elif isinstance(mask, torch.Tensor) and mask.dim() == 4:
            if mask.shape[-1] != state.seq_len or mask.shape[-2] != state.seq_len:
                raise ValueError(f"unexpected attention mask shape {tuple(mask.shape)} for a prompt of "
                                 f"{state.seq_len} tokens")
            mask = gather_columns(gather_columns(mask, layout.tokens, 2), layout.tokens, 3)
            if layout.padded:
                mask = hide_padding(mask, layout.valid, layout.valid)
        else:
            raise ValueError(f"ivcp cannot slice an attention mask of type {type(mask).__name__}; "
                             "use attn_implementation 'sdpa', 'eager' or 'flash_attention_2'")
        # position_ids only tell flash-attention where packed sequences start: each row's kept tokens are
        # one sequence, so none are passed (sliced ids would look like many packed sequences).
        return {"attention_mask": mask, "position_embeddings": self.adapter.join_position_embeddings(rotary),
                "position_ids": None}

    def _record(self, state: _PrefillState, cache) -> BatchRecord:
        n_layers = len(self.adapter.layers)
        layouts = [state.layer_layouts[i] for i in range(n_layers)]
        if cache is not None and len(cache.layers) == n_layers:
            cache_lengths = [int(layer.keys.shape[-2]) for layer in cache.layers]
        else:
            cache_lengths = [layout.width for layout in layouts]
        counts = torch.stack([layout.counts() for layout in layouts], 1).tolist()  # (B, layers)
        visual = torch.stack([(gather_columns(state.visual, layout.tokens, 1) & layout.valid).sum(1)
                              for layout in layouts], 1).tolist()
        n_visual = state.visual.sum(1).tolist()
        padding = (~state.initial_layout.valid).sum(1).tolist()
        method = self.method.describe()
        rows = []
        for row in range(state.batch):
            kept = state.layout.row(row)
            marks = {name: torch.unique(torch.cat(parts)).cpu() for name, parts in state.marks[row].items()}
            rows.append(PrefillRecord(
                segments=[(s.start, s.end) for s in state.segments[row]], strides=[
                    None if s.row_stride is None else (s.grid_w, s.row_stride) for s in state.segments[row]], kept=kept.cpu(), n_visual=int(n_visual[row]),
                n_visual_kept=int(state.visual[row, kept].sum()), kv_lengths=counts[row], seq_len=state.seq_len,
                stages=state.stages[row], marks=marks, visual_kv_per_layer=visual[row],
                selection_seconds=state.row_seconds[row], method=method, padding=int(padding[row])))
        return BatchRecord(rows, cache_lengths, state.selection_seconds, method)

    def _store(self, record: BatchRecord, layout: TokenLayout) -> None:
        self.last, self._last_layout = record, layout
        self.records.append(record)

    def _take_labels(self, module, args, kwargs):
        """A prefill's ``labels`` are taken from the model (its logits cover the kept tokens only) and its
        loss is computed after the forward by :meth:`_loss`."""
        self._labels = None
        if kwargs.get("labels") is None or _stored_length(cache_kwarg(kwargs)) > 0:
            return None  # a continuation's logits are those of its new tokens: the model's own loss is right
        self._labels, self._last_layout = kwargs.pop("labels"), None
        return args, kwargs

    def _loss(self, module, args, kwargs, output):
        """The causal-LM loss over the positions the logits stand for: the logit of input token t (a kept
        one) is scored against ``labels[t + 1]``, as the unpruned model scores it (mean over the labels
        that are not -100). Pad tokens' logits are not scored (the unpruned model scores the last pad's against
        the row's first label)."""
        labels, layout, self._labels = self._labels, self._last_layout, None
        if labels is None:
            return None
        if layout is None:
            raise ValueError("ivcp could not tell which tokens this forward's logits stand for, so it cannot score labels")
        logits = output["logits"] if isinstance(output, dict) else output[0]
        if labels.shape != (layout.batch, layout.seq_len):
            raise ValueError(f"labels {tuple(labels.shape)} do not match input_ids {(layout.batch, layout.seq_len)}")
        following = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
        targets = following.gather(1, layout.tokens.to(labels.device)).masked_fill(~layout.valid.to(labels.device), -100)
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten().to(logits.device),
                                           ignore_index=-100)
        if isinstance(output, dict):
            output["loss"] = loss
            return output
        return (loss,) + tuple(output)

    def _after_model(self, module, args, kwargs, output):
        state, self._state, self._decoding = self._state, None, None
        if state is None:
            return None
        self._vision_calls, self._vision_scores = [], {}
        cache = output_cache(output)
        self._store(self._record(state, cache), state.layout)
        layouts = [state.layer_layouts[i] for i in range(len(self.adapter.layers))]
        if cache is not None and any(not layout.same_as(state.initial_layout) for layout in layouts):
            pos = state.position_ids  # each row's last real position decides where its decoding goes on
            real = torch.where(state.initial_layout.valid[None], pos, torch.iinfo(pos.dtype).min)
            delta = real.amax(dim=(0, 2)).view(-1, 1) + 1 - state.seq_len
            first = layouts[0]
            columns = [None if layout.same_as(first) else first.columns_of(layout) for layout in layouts]
            shifts = None
            if state.layer_shifts:
                zero = torch.zeros(state.batch, dtype=torch.long, device=pos.device)
                shifts = torch.stack([state.layer_shifts.get(i, zero).to(pos.device) for i in range(len(layouts))])
            _mark_pruned(cache, _CacheInfo(state.seq_len, delta, pos.shape[0], layouts, columns,
                                           self.adapter.attn_implementation, shifts, weakref.ref(self.model)))
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
    object. Bad configuration raises ValueError before anything runs. Any batch the family's processor
    makes (left padding for ``generate``, rows with different images or none); each row is pruned as
    it would be alone.
    ``sync_timing`` synchronises CUDA around the selection so ``selection_seconds`` is exact (the
    benchmark sets it; it costs two synchronisations per prefill).
    """
    method_obj = resolve_method(model, method, **params)
    attn = adapter_for(model).attn_implementation
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

