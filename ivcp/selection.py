"""What a pruning method sees, independent of the engine that runs the model.

A :class:`SelectionContext` is one prompt (one batch row, or one request of a serving engine) at a
selection layer K. It holds the prompt's facts as plain tensors (input ids, visual segments, rotary
position ids, the tokens still present) and answers the methods' questions (text queries, value
vectors, attention rows) from them and from one primitive every engine provides: the q / k / v
projections of a layer's input at chosen tokens (:meth:`SelectionContext._projection`). The Hugging
Face hooks (:mod:`ivcp.engine`) and the vLLM plugin (:mod:`ivcp.vllm`) each subclass it, so the method
files run unchanged in both. This module imports neither the engine nor the methods.
"""

from __future__ import annotations

from typing import Callable

import torch

from .adapters.base import RopeSpec, Segment


class SelectionContext:
    """A method's view of one prompt at a selection layer K. All token indices are positions in the
    prompt's input sequence ("global"); tensors keep a batch dimension of one first.

    Subclasses give the model's signals: :meth:`_projection` (required) and, where the engine has
    them, cached keys / values (:meth:`_cached`), hidden states and the vision tower's attention.
    """

    def __init__(self, *, layer: int, stage: int, rope: RopeSpec, input_ids: torch.Tensor,
                 segments: list[Segment], visual: torch.Tensor, alive: torch.Tensor, position_ids: torch.Tensor,
                 last_token: int, marker_token_ids, turn_end_token_ids, valid: torch.Tensor | None = None,
                 attention_scale: Callable[[int], float] | None = None,
                 marks: dict[str, list[torch.Tensor]] | None = None, row: int = 0):
        self.layer, self.stage, self.rope, self.row = layer, stage, rope, row
        self._input_ids = input_ids  # (S,)
        self._segments = segments
        self._visual = visual  # (S,) bool: visual tokens of the prompt
        self._alive = alive  # sorted input indices the layers before K processed
        self._position_ids = position_ids  # (rows, S) rotary ids of every prompt token
        self._last_token = last_token
        self._marker_ids = sorted(marker_token_ids)
        self._turn_end_ids = sorted(turn_end_token_ids)
        self._valid = valid  # (S,) bool: real (not padding) tokens; None: all
        self._attention_scale = attention_scale
        self.marks = {} if marks is None else marks  # name → token sets, the row's record of marks

    # --- the prompt ---------------------------------------------------------------------------
    @property
    def segments(self) -> list[Segment]:
        return self._segments

    @property
    def units(self) -> list[list[Segment]]:
        """The segments grouped by image / frame (a tiled image's tiles and thumbnail together), in order."""
        groups: dict[tuple, list[Segment]] = {}
        for seg in self.segments:
            groups.setdefault(seg.unit, []).append(seg)
        return list(groups.values())

    @property
    def device(self) -> torch.device:
        return self._input_ids.device

    @property
    def seq_len(self) -> int:
        return self._input_ids.shape[0]

    @property
    def input_ids(self) -> torch.Tensor:
        """(1, S) the prompt's input ids."""
        return self._input_ids[None]

    @property
    def last_token(self) -> int:
        """Index of the last prompt token (the one that generates)."""
        return self._last_token

    @property
    def alive(self) -> torch.Tensor:
        """Sorted indices of the tokens the layers before K processed (the row's pad tokens excluded)."""
        return self._alive

    def visual_tokens(self, segment: Segment | None = None) -> torch.Tensor:
        """Sorted indices of the visual tokens still present (of one segment, or of all)."""
        alive = self._alive
        mask = self._visual[alive]
        if segment is not None:
            mask &= torch.isin(alive, segment.indices(alive.device))
        return alive[mask]

    def positions(self, segment: Segment) -> torch.Tensor:
        """Rotary position ids of a segment's tokens: (3, N) for M-RoPE, (N,) for 1-D RoPE."""
        return self.positions_at(segment.indices(self._position_ids.device))

    def positions_at(self, tokens) -> torch.Tensor:
        """Rotary position ids of any prompt tokens (input indices): (3, T) for M-RoPE, (T,) for 1-D RoPE."""
        pos = self._position_ids[:, torch.as_tensor(tokens, device=self._position_ids.device)]
        return pos[0] if pos.shape[0] == 1 else pos

    def text_queries(self, segment: Segment, offset: int = 0) -> torch.Tensor:
        """Text tokens that query a segment: those after it up to the end of the prompt (vision
        markup and other visual tokens excluded); if none, those before it in the same chat turn.
        ``offset`` k: only those from ``segment.end + k`` on (the authors' code starts at k = 2)."""
        ids = self._input_ids
        index = torch.arange(self.seq_len, device=ids.device)
        markers = torch.tensor(self._marker_ids, device=ids.device, dtype=ids.dtype)
        text = ~self._visual & ~torch.isin(ids, markers)
        if self._valid is not None:
            text &= self._valid
        after = text & (index >= segment.end + offset)
        if after.any():
            return index[after]
        before = text & (index < segment.start)
        ends = torch.tensor(self._turn_end_ids, device=ids.device, dtype=ids.dtype)
        turn_ends = index[torch.isin(ids, ends) & (index < segment.start)]
        if turn_ends.numel():
            before &= index > turn_ends.max()
        if not before.any():
            raise ValueError(f"no text tokens around the visual segment at {segment.start}:{segment.end} "
                             "to use as queries")
        return index[before]

    def mark(self, name: str, tokens: torch.Tensor) -> None:
        """Record named token sets (e.g. "ivc", "seed") in the prompt's record (``session.last.marks``)."""
        self.marks.setdefault(name, []).append(tokens.detach().to(torch.long).flatten())

    # --- what an engine provides ----------------------------------------------------------------
    def _projection(self, which: str, layer: int, tokens: torch.Tensor, norm: bool = True,
                    rotary: bool = True) -> torch.Tensor:
        """(1, heads, T, d) projection ``which`` ∈ {q, k, v} of layer ``layer``'s input at ``tokens``
        (after the layer's input norm when ``norm``; q and k rotated by their rotary ids when ``rotary``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _projection")

    def _cached(self, which: str, layer: int, tokens: torch.Tensor) -> torch.Tensor | None:
        """(1, kv_heads, T, d) cached keys (rotated) or values of ``layer`` at ``tokens``, or None when the
        engine has no such cache at hand (the projection is computed then)."""
        return None

    def _unavailable(self, what: str):
        return NotImplementedError(f"{what} is not available to methods in {type(self).__name__}")

    def hidden_states(self, tokens) -> torch.Tensor:
        """Input hidden states of layer K at ``tokens``, (1, T, hidden), in the model's dtype. At K = 0
        these are the input embeddings: the vision tower's merged features for visual tokens."""
        raise self._unavailable("hidden_states")

    def update_hidden(self, tokens, values: torch.Tensor) -> None:
        """Replace the hidden states of ``tokens`` (kept ones) before layer K, e.g. to merge dropped
        tokens into them. ``values`` is (1, T, hidden)."""
        raise self._unavailable("update_hidden")

    @property
    def vision_local_block(self) -> int:
        """The model's default local-attention vision block (Qwen2.5-VL: its first full-attention block)."""
        raise self._unavailable("vision_local_block")

    @property
    def vision_global_block(self) -> int:
        """The last vision block whose output reaches the LLM."""
        raise self._unavailable("vision_global_block")

    @property
    def vision_depth(self) -> int:
        raise self._unavailable("vision_depth")

    def vision_attention(self, segment: Segment, block: int, signal: str = "received") -> torch.Tensor:
        """Attention the segment's tokens receive in vision block ``block`` (mean over heads and
        queries, pooled over each merge group), (N,) in the segment's raster order; ``signal="cls"``: the
        CLS token's attention row instead (towers with a CLS token)."""
        raise self._unavailable("vision_attention")

    # --- signals from the model -------------------------------------------------------------
    def _tokens(self, tokens) -> torch.Tensor:
        return torch.as_tensor(tokens, device=self.device, dtype=torch.long).flatten()

    def _check_layer(self, layer: int) -> int:
        if layer not in (self.layer - 1, self.layer) or layer < 0:
            raise ValueError(f"signals are available from layers {self.layer - 1} and {self.layer} only "
                             f"(selection at layer {self.layer}), not {layer}")
        return layer

    @torch.no_grad()
    def values(self, tokens, layer: int | None = None, norm: bool = True) -> torch.Tensor:
        """Value vectors (v_proj output, no rotary) of layer K−1, float32, (1, kv_heads, T, d); with
        ``norm=False``, of the layer's input without its input norm (the authors' InternVL code)."""
        layer = self._check_layer(self.layer - 1 if layer is None else layer)
        cached = self._cached("v", layer, tokens) if norm else None
        if cached is not None:
            return cached.float()
        return self._projection("v", layer, tokens, norm=norm).float()

    @torch.no_grad()
    def keys(self, tokens, layer: int | None = None, norm: bool = True, rotary: bool = True) -> torch.Tensor:
        """Key vectors of a layer's input (K−1 by default), float32, (1, kv_heads, T, d)."""
        layer = self._check_layer(self.layer - 1 if layer is None else layer)
        cached = self._cached("k", layer, tokens) if norm and rotary else None
        if cached is not None:
            return cached.float()
        return self._projection("k", layer, tokens, norm=norm, rotary=rotary).float()

    @torch.no_grad()
    def queries(self, tokens, layer: int | None = None, rotary: bool = True) -> torch.Tensor:
        """Query vectors of a layer's input (K−1 by default), float32, (1, heads, T, d)."""
        layer = self._check_layer(self.layer - 1 if layer is None else layer)
        return self._projection("q", layer, tokens, rotary=rotary).float()

    def _check_present(self, tokens) -> torch.Tensor:
        tokens = self._tokens(tokens)
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.seq_len):
            raise ValueError(f"asked for signals of tokens outside the prompt (0..{self.seq_len - 1})")
        if not torch.isin(tokens, self._alive).all():
            raise ValueError("asked for signals of tokens that were already pruned")
        return tokens

    @torch.no_grad()
    def attention(self, query_tokens, key_tokens, layer: int | None = None, rotary: bool = True) -> torch.Tensor:
        """Attention probabilities of ``query_tokens`` to ``key_tokens`` at a layer, (1, heads, Q, T).

        Softmax runs over every present key the query sees (causal), as in the model; only the
        requested columns are returned. Computed from q and the (cached) keys: O(Q·S) work.
        """
        layer = self.layer - 1 if layer is None else layer
        alive = self._alive
        q = self.queries(query_tokens, layer, rotary=rotary)
        k = self.keys(alive, layer, rotary=rotary)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        if self._attention_scale is None:
            raise self._unavailable("attention (no attention scale given)")
        logits = (q @ k.transpose(-1, -2)) * self._attention_scale(layer)  # (1, H, Q, S_alive)
        hidden = alive[None, :] > self._tokens(query_tokens)[:, None]
        probs = logits.masked_fill(hidden, float("-inf")).softmax(-1)
        self._check_present(key_tokens)
        return probs[..., torch.searchsorted(alive, self._tokens(key_tokens))]

    def last_token_attention(self, layer: int | None = None, rotary: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(present visual tokens, the last prompt token's attention to each, mean over heads) at a layer
        (K−1 by default): the score of FastV and of the methods built on it."""
        visual = self.visual_tokens()
        return visual, self.attention([self.last_token], visual, layer, rotary)[0].mean(0)[0]

