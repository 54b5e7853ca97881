"""Texts to model inputs and hidden states to pooled vectors, shared by extraction and LoRA.

One convention for both: texts are tokenized with the tokenizer's own special tokens and
truncated to ``max_length``; a text's *valid* positions are its tokens after the BOS position
(when ``drop_bos`` and the tokenizer put one there); batches are padded on the right or the left
with explicit position ids (0, 1, ... from each text's first token), so the padding side changes
no hidden state; pooling is the mean over valid positions. What the tokens of a model are (its
BOS and pad ids) is asked of `ntps_nb.models`, how a model is called as well.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int

from ntps_nb.core.validation import check_count
from ntps_nb.models import bos_token_id

__all__ = [
    "PADDING_SIDES",
    "PaddedBatch",
    "PoolingTokens",
    "mask_states",
    "mean_pool",
    "pad_batch",
    "pooling_tokens",
    "tokenize",
    "valid_mask",
]

PaddingSide = Literal["right", "left"]
PADDING_SIDES: tuple[str, ...] = ("right", "left")


class PaddedBatch(NamedTuple):
    """Model inputs of one batch (``model(**batch._asdict())``), on one device."""

    input_ids: Int[torch.Tensor, "B T"]
    attention_mask: Int[torch.Tensor, "B T"]
    position_ids: Int[torch.Tensor, "B T"]


class PoolingTokens(NamedTuple):
    """Token ids of texts and which of their positions are pooled."""

    ids: list[list[int]]
    starts: Int[np.ndarray, " N"]  # 1 where position 0 is a BOS left out of pooling, else 0
    lengths: Int[np.ndarray, " N"]  # valid (pooled) positions per text


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length``, special tokens as the tokenizer adds them.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
    texts : sequence of str, length N
    max_length : int
        Truncation length in tokens (a positive integer).

    Returns
    -------
    list of N lists of int
    """
    max_length = check_count(max_length, "max_length")
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]
    return [list(ids) for ids in encoded]


def pooling_tokens(
    tokenizer, texts: Sequence[str], max_length: int, *, drop_bos: bool, what: str = "text(s)"
) -> PoolingTokens:
    """Tokenize texts and mark the BOS position to leave out of pooling; refuse texts with nothing to pool.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
    texts : sequence of str, length N
    max_length : int
        Truncation length in tokens.
    drop_bos : bool
        Leave the first position out when it is the tokenizer's BOS token (it still serves as
        context for the others).
    what : str
        How the error message names the texts (e.g. ``"train text(s)"``).

    Returns
    -------
    PoolingTokens
        ``ids`` (N lists), ``starts`` (N,) and ``lengths`` (N,) = ``len(ids) - starts``, all >= 1.
    """
    ids = tokenize(tokenizer, texts, max_length)
    bos = bos_token_id(tokenizer)
    starts = np.array([1 if drop_bos and bos is not None and len(t) > 0 and t[0] == bos else 0 for t in ids])
    lengths = np.array([len(t) for t in ids]) - starts
    empty = np.flatnonzero(lengths < 1)
    if empty.size:
        raise ValueError(f"{empty.size} {what} have no token to pool (empty after tokenization"
                         f"{' and dropping BOS' if drop_bos else ''}): indices {empty[:10].tolist()}")
    return PoolingTokens(ids, starts, lengths)


def _check_side(padding_side: str) -> None:
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")


def pad_batch(
    batch_ids: Sequence[Sequence[int]], pad_id: int, padding_side: PaddingSide = "right", device=None
) -> PaddedBatch:
    """Pad token ids to one length with explicit position ids, on ``device``.

    Parameters
    ----------
    batch_ids : B sequences of int
    pad_id : int
        Fills the padding (masked out; its value changes nothing).
    padding_side : "right" or "left"
    device : torch.device or str, optional
        Where the tensors go (default: the CPU).

    Returns
    -------
    PaddedBatch
        ``input_ids``, ``attention_mask`` (1 on tokens) and ``position_ids`` (0 at each text's
        first token, counting up; 0 on left padding), each (B, T) with T the longest text.
    """
    _check_side(padding_side)
    T = max(len(t) for t in batch_ids)
    input_ids = torch.full((len(batch_ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch_ids), T), dtype=torch.long)
    for row, tokens in enumerate(batch_ids):
        span = slice(0, len(tokens)) if padding_side == "right" else slice(T - len(tokens), T)
        input_ids[row, span] = torch.as_tensor(tokens)
        mask[row, span] = 1
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return PaddedBatch(input_ids.to(device), mask.to(device), position_ids.to(device))


def valid_mask(
    n_tokens: Sequence[int], starts: Sequence[int], T: int, padding_side: PaddingSide = "right", device=None
) -> Bool[torch.Tensor, "B T"]:
    """True at the positions that are pooled and enter the moments: not padding, not a dropped BOS.

    Parameters
    ----------
    n_tokens : (B,) tokens per text (including a BOS that is dropped).
    starts : (B,) 1 where the text's first token is left out, else 0.
    T : int
        Padded length of the batch.
    padding_side : "right" or "left", as the batch was padded.
    device : where the mask goes.

    Returns
    -------
    Tensor of bool, shape (B, T)
    """
    _check_side(padding_side)
    positions = torch.arange(T)
    n = torch.as_tensor(n_tokens)[:, None]
    s = torch.as_tensor(starts)[:, None]
    if padding_side == "right":
        valid = (positions >= s) & (positions < n)
    else:
        valid = positions >= (T - n + s)
    return valid.to(device)


def mask_states(
    hidden: Float[torch.Tensor, "B T d"], valid: Bool[torch.Tensor, "B T"], dtype: torch.dtype
) -> Float[torch.Tensor, "B T d"]:
    """Hidden states in ``dtype`` with every position that is not valid set to exactly zero.

    Parameters
    ----------
    hidden : Tensor, shape (B, T, d)
    valid : Tensor of bool, shape (B, T)
    dtype : torch.dtype
        Precision of the result.

    Returns
    -------
    Tensor, shape (B, T, d)
    """
    return torch.where(valid[..., None], hidden.to(dtype), 0)


def mean_pool(
    hidden: Float[torch.Tensor, "B T d"], valid: Bool[torch.Tensor, "B T"], dtype: torch.dtype = torch.float32
) -> Float[torch.Tensor, "B d"]:
    """Mean of the hidden states over each text's valid positions, computed in ``dtype``.

    Parameters
    ----------
    hidden : Tensor, shape (B, T, d)
    valid : Tensor of bool, shape (B, T); every row has at least one True.
    dtype : torch.dtype
        Precision of the sum and the division.

    Returns
    -------
    Tensor, shape (B, d)
    """
    return mask_states(hidden, valid, dtype).sum(dim=1) / valid.sum(dim=1, keepdim=True)
