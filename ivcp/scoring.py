"""Scores and selection rules shared by methods (pure tensor functions, no model).

Conventions: counts round with Python's ``round`` (half to even), rankings are descending with ties
broken by the lower index.
"""

from __future__ import annotations

import functools

import torch

from .adapters.base import RopeSpec

IVC_MODES = ("reference", "sectioned")


def count(ratio: float, n: int) -> int:
    """round(ratio · n), Python's round."""
    return int(round(ratio * n))


def keep_count(ratio: float, n: int) -> int:
    """Tokens a budget of ``ratio`` keeps out of ``n``: round(ratio · n), but at least one when n > 0,
    so no image or frame ever vanishes from the prompt."""
    return max(1, count(ratio, n)) if n > 0 else 0


def top_covering(ranked: torch.Tensor, k: int, segments) -> torch.Tensor:
    """The first ``k`` of ``ranked`` (input indices, best first), adjusted so that every segment with
    tokens in ``ranked`` keeps at least one: a segment left out gets its best-ranked token in place of
    the lowest-ranked choice of a segment that keeps several (more than ``k`` only when there are
    more segments than ``k``). For methods that rank all images' tokens together (FastV, PDrop)."""
    chosen = ranked[:k].tolist()
    if any(s.row_stride is not None for s in segments):  # interleaved tiles (DeepSeek-VL2): look each token up
        owner = {t: i for i, s in enumerate(segments) for t in s.indices().tolist()}
        segment_of = owner.__getitem__
    else:
        starts = torch.tensor([s.start for s in segments])
        segment_of = lambda token: int(torch.searchsorted(starts, token, right=True)) - 1  # noqa: E731
    kept_per_segment: dict[int, int] = {}
    for token in chosen:
        kept_per_segment[segment_of(token)] = kept_per_segment.get(segment_of(token), 0) + 1
    for token in ranked[k:].tolist():
        segment = segment_of(token)
        if segment in kept_per_segment:
            continue
        donor = next((i for i in range(len(chosen) - 1, -1, -1) if kept_per_segment[segment_of(chosen[i])] > 1), None)
        if donor is not None:
            kept_per_segment[segment_of(chosen[donor])] -= 1
            chosen.pop(donor)
        chosen.append(token)
        kept_per_segment[segment] = 1
    return torch.tensor(chosen, dtype=torch.long, device=ranked.device)


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, best first; equal scores rank by lower index."""
    k = max(0, min(int(k), scores.numel()))
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices
    return order[:k]


def ivc_scores(positions: torch.Tensor, rope: RopeSpec, mode: str = "reference") -> tuple[torch.Tensor, torch.Tensor]:
    """IVC scores of tokens at integer rotary ``positions`` (eq. 7, 8), in float64.

    V(m) = Σ cos(p(m)·θ_k), U(m) = Σ sin(p(m)·θ_k), θ_k = theta^(−2k/d).
    ``positions`` is (N,) for 1-D RoPE or (3, N) for M-RoPE (t, h, w streams). M-RoPE modes:
    ``reference`` sums every frequency over all three streams (the authors' code);
    ``sectioned`` lets stream a rotate only its own frequencies (the model's rotation: contiguous
    ``mrope_section`` blocks, or interleaved for Qwen3-VL — see ``RopeSpec.frequency_streams``).
    Returns (V, U), each (N,).
    """
    if mode not in IVC_MODES:
        raise ValueError(f"ivc_mode must be one of {IVC_MODES}, got {mode!r}")
    key = (tuple(positions.shape), positions.detach().to("cpu", torch.int64).numpy().tobytes(), rope, mode)
    v, u = _ivc_scores_cached(*key)
    return v.to(positions.device), u.to(positions.device)


@functools.lru_cache(maxsize=256)
def _ivc_scores_cached(shape: tuple[int, ...], data: bytes, rope: RopeSpec, mode: str):
    # Scores depend only on positions and rope parameters: cached per distinct (positions, rope, mode).
    positions = torch.frombuffer(bytearray(data), dtype=torch.int64).view(shape).to(torch.float64)
    inv_freq = rope.inv_freq(torch.float64)  # (d/2,)
    if positions.dim() == 1:
        angles = positions[:, None] * inv_freq  # (N, d/2)
        return angles.cos().sum(-1), angles.sin().sum(-1)
    if positions.shape[0] != 3 or rope.mrope_section is None:
        raise ValueError("M-RoPE scores need (3, N) positions and a rope with mrope_section")
    angles = positions[:, :, None] * inv_freq  # (3, N, d/2)
    if mode == "reference":
        # Σ over streams of the per-stream sums; sorted first, so tokens whose (t, h, w) are a
        # permutation of each other tie exactly (float addition is not associative).
        per_stream_v, per_stream_u = angles.cos().sum(2), angles.sin().sum(2)  # (3, N)
        return per_stream_v.sort(0).values.sum(0), per_stream_u.sort(0).values.sum(0)
    stream = rope.frequency_streams()  # frequency → the stream it rotates with (contiguous or interleaved)
    chosen = angles[stream, :, torch.arange(inv_freq.numel())]  # (d/2, N): frequency k under its own stream
    return chosen.cos().sum(0), chosen.sin().sum(0)


def ivc_token_set(v: torch.Tensor, u: torch.Tensor, ratio: float) -> torch.Tensor:
    """Union of the top round(ratio·N) tokens by V and the top round(ratio·N) by U, sorted."""
    k = count(ratio, v.numel())
    return torch.unique(torch.cat([top_k(v, k), top_k(u, k)]))


def value_attention(queries: torch.Tensor, keys: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
    """softmax over the keys of (q · kᵀ / √d) per head, averaged over heads (float32), no mask.

    ``queries`` (H, Q, d), ``keys`` (H, S, d) → (Q, S); with ``columns`` only those key columns are
    returned (the softmax still runs over all S keys)."""
    q, k = queries.float(), keys.float()
    logits = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
    probs = logits.softmax(-1).mean(0)
    return probs if columns is None else probs[:, columns]


def foreground_scores(text_values: torch.Tensor, image_values: torch.Tensor, seed_ratio: float, stages: int = 2,
                      context_values: torch.Tensor | None = None, image_columns: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two-stage foreground from value vectors (eq. 9, 10).

    Stage 1: s = mean over text rows of value_attention(V_text, V_img); seeds = top max(1, round(seed_ratio·N)).
    Stage 2: f = mean over text rows and seed rows (V_img[seeds] as queries) of value_attention.
    ``text_values`` (H, L, d), ``image_values`` (H, N, d). The softmax runs over the N image tokens, or,
    with ``context_values`` (H, S, d) and ``image_columns`` (the image's N positions among them), over
    every token of the prompt (the authors' LLaVA / InternVL code). Returns (s, seeds, f); with
    ``stages=1`` f = s and there are no seeds.
    """
    keys = image_values if context_values is None else context_values
    rows = lambda queries: value_attention(queries, keys, image_columns)  # noqa: E731
    return foreground_from_rows(rows(text_values), lambda seeds: rows(image_values[:, seeds]), seed_ratio, stages)


def foreground_from_rows(text_rows: torch.Tensor, seed_rows, seed_ratio: float, stages: int = 2
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 9/10 on any similarity rows: ``text_rows`` (L, N); ``seed_rows(seeds)`` → (n_seed, N)."""
    s = text_rows.mean(0)
    if stages == 1:
        return s, torch.empty(0, dtype=torch.long, device=s.device), s
    seeds = top_k(s, max(1, count(seed_ratio, s.numel())))
    f = torch.cat([text_rows, seed_rows(seeds)]).mean(0)
    return s, seeds, f


def fill_to_budget(initial: torch.Tensor, scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Start from ``initial``; add tokens in descending ``scores`` (skipping those present) until there
    are ``budget`` tokens. If ``initial`` alone is larger, it is returned whole. Sorted result."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[initial] = True
    missing = budget - int(keep.sum())
    if missing > 0:
        order = top_k(scores, scores.numel())
        candidates = order[~keep[order]]
        keep[candidates[:missing]] = True
    return keep.nonzero().flatten()
