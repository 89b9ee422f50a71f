"""Which prompt tokens a layer's hidden states and KV cache hold, for a batch whose rows keep different tokens.

After a selection every row of a batch keeps its own tokens, so rows hold different numbers of them. The
engine stores them left-padded to the batch's longest row: a :class:`TokenLayout` says, per row and column,
which input token a column holds and whether it is real or padding. Padding columns repeat a real token of
their row (finite values everywhere) and are masked: no query attends to them, and they attend to
themselves only (no empty softmax row). Each row's real tokens stay in input order, so causal attention
among them is causal attention over the kept tokens, and the last column of every row is its last
prompt token (the one that generates).

The mask helpers here work on the forms transformers hands to decoder layers: 4-D (B or 1, heads or 1,
queries, keys) boolean (sdpa: True = attend) or additive float (eager), 2-D (B, keys) padding masks
(flash-attention), or None (plain causal).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TokenLayout:
    """``tokens`` (B, L): the input index each column holds; ``valid`` (B, L): False on padding columns.
    Each row's valid tokens are sorted and distinct; a row's padding columns repeat one of its valid tokens."""

    tokens: torch.Tensor
    valid: torch.Tensor
    seq_len: int  # input length S (tokens index 0..S-1)
    _columns: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def full(cls, batch: int, seq_len: int, padding: torch.Tensor | None, device) -> "TokenLayout":
        """Every input column, the batch's own padding (``padding`` (B, S) True on pad tokens) invalid."""
        tokens = torch.arange(seq_len, device=device).expand(batch, seq_len)
        valid = torch.ones(batch, seq_len, dtype=torch.bool, device=device) if padding is None else ~padding
        return cls(tokens, valid, seq_len)

    @classmethod
    def pack(cls, rows: list[torch.Tensor], seq_len: int) -> "TokenLayout":
        """Rows of sorted input indices, left-padded to the longest (each row needs at least one token)."""
        width = max(int(r.numel()) for r in rows)
        device = rows[0].device
        tokens = torch.empty(len(rows), width, dtype=torch.long, device=device)
        valid = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
        for b, row in enumerate(rows):
            n = int(row.numel())
            tokens[b, width - n:] = row
            tokens[b, : width - n] = row[0]
            valid[b, width - n:] = True
        return cls(tokens, valid, seq_len)

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    @property
    def padded(self) -> bool:
        """True if some column is padding."""
        return not bool(self.valid.all())

    def row(self, b: int) -> torch.Tensor:
        """Sorted input indices of row ``b``'s real tokens."""
        return self.tokens[b][self.valid[b]]

    def counts(self) -> torch.Tensor:
        """(B,) real tokens per row."""
        return self.valid.sum(1)

    def columns(self) -> torch.Tensor:
        """(B, S): the column holding each input token, −1 where the row does not hold it."""
        if self._columns is None:
            index = torch.arange(self.width, device=self.tokens.device).expand(self.batch, -1)
            target = torch.where(self.valid, self.tokens, self.seq_len)  # padding columns write to a spare slot
            cols = torch.full((self.batch, self.seq_len + 1), -1, dtype=torch.long, device=self.tokens.device)
            self._columns = cols.scatter(1, target, torch.where(self.valid, index, -1))[:, : self.seq_len]
        return self._columns

    def columns_of(self, other: "TokenLayout") -> torch.Tensor:
        """(B, other.width): the column of this layout holding each column's token of ``other`` (a layout of a
        subset of these tokens); padding columns of ``other`` point at their repeated token."""
        return self.columns().gather(1, other.tokens)

    def same_as(self, other: "TokenLayout") -> bool:
        return self is other or (self.tokens.shape == other.tokens.shape and torch.equal(self.valid, other.valid)
                                 and torch.equal(self.tokens, other.tokens))

    def ranks(self) -> torch.Tensor:
        """(B, L): each column's index among its row's real tokens (padding columns: −1)."""
        return torch.where(self.valid, self.valid.long().cumsum(1) - 1, -1)


def gather_columns(x: torch.Tensor, columns: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` with dimension ``dim`` (its columns) replaced by ``columns`` (B, L) per batch row; a size-1
    batch dimension of ``x`` is broadcast."""
    batch = columns.shape[0]
    if x.shape[0] != batch:
        x = x.expand(batch, *x.shape[1:])
    shape = [1] * x.dim()
    shape[0], shape[dim] = batch, columns.shape[1]
    index = columns.view(shape).expand(*[columns.shape[1] if d == dim else s for d, s in enumerate(x.shape)])
    return x.gather(dim, index)


def masked_value(mask: torch.Tensor):
    """The value that hides a key in ``mask``: False (boolean masks) or the dtype's minimum (additive ones)."""
    return False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min


def hide_padding(mask: torch.Tensor, query_valid: torch.Tensor | None, key_valid: torch.Tensor) -> torch.Tensor:
    """A 4-D mask with the padding keys hidden from every query, and padding queries (``query_valid`` False)
    seeing only themselves (their own key column; queries and keys are the same columns then)."""
    hidden = masked_value(mask)
    allowed = key_valid[:, None, None, :]
    mask = torch.where(allowed, mask, hidden)
    if query_valid is not None and not bool(query_valid.all()):
        eye = torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)[None, None]
        own = torch.zeros((), dtype=mask.dtype, device=mask.device) if mask.dtype != torch.bool else True
        pad_rows = ~query_valid[:, None, :, None]
        mask = torch.where(pad_rows, torch.where(eye, own, hidden), mask)
    return mask


def causal_mask(valid: torch.Tensor, attn_implementation: str | None, dtype: torch.dtype) -> torch.Tensor:
    """The prefill mask of a layout that the model itself would have left implicit (plain causal): causal
    over the columns with the padding hidden, in the form the attention implementation takes."""
    width = valid.shape[1]
    if _is_flash(attn_implementation):
        return valid.clone()
    causal = torch.ones(width, width, dtype=torch.bool, device=valid.device).tril()[None, None]
    mask = causal.expand(valid.shape[0], 1, width, width)
    if attn_implementation != "sdpa":
        mask = torch.zeros(mask.shape, dtype=dtype, device=valid.device).masked_fill(~mask, torch.finfo(dtype).min)
    return hide_padding(mask, valid, valid)


def decode_mask(prompt_valid: torch.Tensor, generated: int, queries: int, attn_implementation: str | None,
                dtype: torch.dtype) -> torch.Tensor:
    """The decode mask of a layer whose prompt entries are ``prompt_valid`` (B, n), followed by ``generated``
    cached decode entries and ``queries`` new tokens (causal among themselves)."""
    batch, device = prompt_valid.shape[0], prompt_valid.device
    if _is_flash(attn_implementation):
        return torch.cat([prompt_valid, torch.ones(batch, generated + queries, dtype=torch.bool, device=device)], 1)
    tail = torch.ones(queries, generated + queries, dtype=torch.bool, device=device).tril(generated)
    allowed = torch.cat([prompt_valid[:, None, None, :].expand(batch, 1, queries, -1),
                         tail[None, None].expand(batch, 1, -1, -1)], dim=-1)
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def _is_flash(attn_implementation: str | None) -> bool:
    return bool(attn_implementation) and attn_implementation.startswith("flash_attention")
