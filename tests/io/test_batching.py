"""Batching shared by extraction and LoRA: padding, valid positions and pooling, against loops."""

import numpy as np
import pytest
import torch

from ntps_nb.batching import mean_pool, pad_batch, pooling_tokens, tokenize, valid_mask
from ntps_nb.extract import extract
from ntps_nb.lora import pooled_last_hidden
from ntps_nb.models import hidden_states, pad_token_id

TEXTS = ["The film was a delight.", "Dull.", "A long, meandering story that never finds its footing.", "ok"]
# float32 products of the pooled mean (LoRA) against float64 products (extraction), on float32 states
POOL_RTOL = 1e-5


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_batch_places_tokens_and_counts_positions_from_each_text(side):
    ids = [[5, 6, 7], [8], [9, 10]]
    batch = pad_batch(ids, pad_id=0, padding_side=side)
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.position_ids.shape == (3, 3)
    for row, tokens in enumerate(ids):
        on = batch.attention_mask[row].bool()
        assert batch.input_ids[row][on].tolist() == tokens
        assert (batch.input_ids[row][~on] == 0).all()
        assert batch.position_ids[row][on].tolist() == list(range(len(tokens)))
        first = 0 if side == "right" else 3 - len(tokens)
        assert on.nonzero().squeeze(1).tolist() == list(range(first, first + len(tokens)))


@pytest.mark.parametrize("side", ["right", "left"])
def test_valid_mask_is_the_tokens_after_a_dropped_bos(side):
    n_tokens, starts, T = [4, 1, 3], [1, 0, 0], 5
    mask = valid_mask(n_tokens, starts, T, side)
    for row, (n, start) in enumerate(zip(n_tokens, starts)):
        first = 0 if side == "right" else T - n
        expected = [first + start <= t < first + n for t in range(T)]
        assert mask[row].tolist() == expected


def test_mean_pool_is_the_mean_over_valid_positions():
    rng = np.random.default_rng(0)
    hidden = torch.as_tensor(rng.standard_normal((3, 5, 4)))
    valid = valid_mask([4, 1, 5], [1, 0, 1], 5, "right")
    pooled = mean_pool(hidden, valid, torch.float64).numpy()
    for row in range(3):
        positions = valid[row].numpy()
        np.testing.assert_allclose(pooled[row], hidden[row].numpy()[positions].mean(axis=0), rtol=1e-15)


def test_pooling_tokens_drop_only_a_leading_bos(tiny_llama):
    _, tok, info = tiny_llama
    ids = tokenize(tok, TEXTS, 8)
    dropped = pooling_tokens(tok, TEXTS, 8, drop_bos=True)
    kept = pooling_tokens(tok, TEXTS, 8, drop_bos=False)
    assert dropped.ids == kept.ids == ids
    adds_bos = [bool(t) and t[0] == info.bos_token_id for t in ids]
    assert dropped.starts.tolist() == [int(b) for b in adds_bos] and kept.starts.tolist() == [0] * len(TEXTS)
    np.testing.assert_array_equal(dropped.lengths, [len(t) for t in ids] - dropped.starts)
    with pytest.raises(ValueError, match=r"2 train text\(s\) have no token to pool.*indices \[0, 2\]"):
        pooling_tokens(tok, ["", "fine", ""], 8, drop_bos=True, what="train text(s)")
    with pytest.raises(ValueError, match="max_length must be a positive integer, got 0"):
        tokenize(tok, TEXTS, 0)
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left'"):
        pad_batch(ids, 0, "middle")


def test_padding_side_changes_no_valid_hidden_state(tiny_llama):
    model, tok, _ = tiny_llama
    ids = tokenize(tok, TEXTS, 16)
    states = {}
    for side in ("right", "left"):
        batch = pad_batch(ids, pad_token_id(tok), side)
        with torch.no_grad():
            hidden = hidden_states(model, batch)[-1]
        valid = valid_mask([len(t) for t in ids], [0] * len(ids), batch.input_ids.shape[1], side)
        states[side] = [hidden[row][valid[row]] for row in range(len(ids))]
    for right, left in zip(states["right"], states["left"]):
        torch.testing.assert_close(right, left, rtol=1e-5, atol=1e-6)


def test_lora_pools_the_last_layer_as_extraction_does(tiny_llama):
    model, tok, info = tiny_llama
    pooled = extract(model, tok, (TEXTS, [0, 1, 0, 1]), layers=[info.n_layers], pooled_layers="all",
                     pooled_dtype="float64", max_length=16, token_moments=False, progress=False).pooled[info.n_layers]
    tokens = pooling_tokens(tok, TEXTS, 16, drop_bos=True)
    with torch.no_grad():
        lora_pooled = pooled_last_hidden(model, tokens.ids, tokens.starts, pad_token_id(tok)).numpy()
    np.testing.assert_allclose(lora_pooled, pooled, rtol=POOL_RTOL, atol=1e-6)
