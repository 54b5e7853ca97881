"""Streaming extraction against brute force on tiny random models."""

import dataclasses
import numpy as np
import pandas as pd
import pytest
import torch

from ntps_nb import LayerMoments, moments_from_sequences, ntps
from ntps_nb.extract import (FLOAT64_TOKEN_PAIRS_PER_DIM, Extraction, extract, extract_cached, fewest_pairs_read,
                             resolve_precision, token_precision, tokenize)
from ntps_nb.models import hidden_state_layers

STREAM_RTOL = 1e-10

TEXTS = [
    "The film was a delight from start to finish.",
    "Dull.",
    "A long, meandering story that never quite finds its footing, though the cast tries hard.",
    "I laughed, I cried, I went home happy.",
    "Not worth the ticket price at all",
    "ok",
    "An ambitious failure, but a fascinating one to watch unfold on a big screen.",
    "Brilliant acting; weak script.",
    "What a mess",
    "Five stars.",
    "The sequel outdoes the original in every way that matters.",
]
LABELS = [1, 0, 0, 1, 0, 2, 2, 1, 0, 1, 2]


@pytest.fixture(scope="module")
def llama64():
    from ntps_nb.models import load_model

    return load_model("tiny-llama", dtype=torch.float64, seed=0)


@pytest.fixture(scope="module")
def gpt2_64():
    from ntps_nb.models import load_model

    return load_model("tiny-gpt2", dtype=torch.float64, seed=0)


def brute_force(model, tokenizer, texts, labels, *, max_length=256, drop_bos=True, prepend=None):
    """Run every text alone (no padding), keep all hidden states, apply the definitions."""
    per_layer = None
    for ids in tokenize(tokenizer, texts, max_length):
        ids = ([prepend] if prepend is not None else []) + ids
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        start = 1 if drop_bos and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id else 0
        states = [h[0, start:].double().numpy() for h in out.hidden_states]
        if per_layer is None:
            per_layer = [[] for _ in states]
        for layer, h in enumerate(states):
            per_layer[layer].append(h)
    C = max(labels) + 1
    return {layer: moments_from_sequences(seqs, labels, C) for layer, seqs in enumerate(per_layer)}, per_layer


def assert_moments_close(ours, theirs, rtol=STREAM_RTOL):
    for name, value in theirs.arrays().items():
        got = getattr(ours, name)
        scale = np.abs(value).max()
        np.testing.assert_allclose(got, value, rtol=0, atol=rtol * scale, err_msg=name)
    assert ours.n_texts == theirs.n_texts and ours.n_tokens == theirs.n_tokens


@pytest.mark.parametrize("fixture", ["llama64", "gpt2_64"])
def test_streaming_equals_brute_force_every_layer(fixture, request):
    model, tok, _ = request.getfixturevalue(fixture)
    result = extract(model, tok, (TEXTS, LABELS), batch_size=4, precision="float64", progress=False,
                     pooled_layers="all")
    expected, states = brute_force(model, tok, TEXTS, LABELS)
    assert result.moments.layers == list(expected)
    for layer, m in expected.items():
        assert_moments_close(result.moments[layer], m)
        pooled = np.stack([h.mean(axis=0) for h in states[layer]])
        np.testing.assert_allclose(result.pooled[layer], pooled, rtol=1e-5, atol=1e-6)  # stored as float32


def test_padding_side_batch_size_and_order_change_nothing(llama64):
    model, tok, _ = llama64
    reference = extract(model, tok, (TEXTS, LABELS), batch_size=1, precision="float64", progress=False)
    order = np.random.default_rng(0).permutation(len(TEXTS))
    variants = [
        dict(batch_size=7, padding_side="left"),
        dict(batch_size=32, padding_side="right"),
        dict(batch_size=3, padding_side="left"),
    ]
    for kwargs in variants:
        other = extract(model, tok, (TEXTS, LABELS), precision="float64", progress=False, **kwargs)
        for layer in reference.moments:
            assert_moments_close(other.moments[layer], reference.moments[layer], rtol=1e-12)
    shuffled = extract(model, tok, ([TEXTS[i] for i in order], [LABELS[i] for i in order]), batch_size=5,
                       precision="float64", progress=False)
    for layer in reference.moments:
        assert_moments_close(shuffled.moments[layer], reference.moments[layer], rtol=1e-12)


def test_drop_bos_removes_exactly_the_bos_position(llama64):
    model, tok, _ = llama64
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    class WithBos:
        """The same tokenizer, but it prepends a BOS token (as Gemma's does)."""

        bos_token_id = bos
        pad_token_id = tok.pad_token_id

        def __call__(self, texts, **kwargs):
            out = tok(texts, **kwargs)
            return {"input_ids": [[bos] + ids for ids in out["input_ids"]]}

    wrapped = WithBos()
    dropped = extract(model, wrapped, (TEXTS, LABELS), batch_size=4, precision="float64", progress=False)
    kept = extract(model, wrapped, (TEXTS, LABELS), batch_size=4, precision="float64", drop_bos=False, progress=False)
    expected_dropped, _ = brute_force(model, wrapped, TEXTS, LABELS, drop_bos=True)
    expected_kept, _ = brute_force(model, wrapped, TEXTS, LABELS, drop_bos=False)
    for layer in (0, 2):
        assert_moments_close(dropped.moments[layer], expected_dropped[layer])
        assert_moments_close(kept.moments[layer], expected_kept[layer])
    assert kept.moments[0].n_tokens - dropped.moments[0].n_tokens == len(TEXTS)
    assert dropped.metadata["bos_dropped"] == len(TEXTS)


def test_float32_products_are_close_to_float64(tiny_llama):
    model, tok, _ = tiny_llama
    texts, labels = TEXTS * 4, LABELS * 4  # more token pairs than FLOAT64_TOKEN_PAIRS_PER_DIM x d: float32 products
    m32 = extract(model, tok, (texts, labels), precision="float32", progress=False).moments
    m64 = extract(model, tok, (texts, labels), precision="float64", progress=False).moments
    assert m32[0].n_tokens > FLOAT64_TOKEN_PAIRS_PER_DIM * m32[0].d
    assert m32.metadata["precision"] == m32.metadata["token_precision"] == "float32"
    assert set(m32.metadata["timings_s"]) == {"pass", "finalise_device", "finalise_host", "finalise_checks",
                                              "rounding_check"}
    for layer in m32:
        for name, value in m64[layer].arrays().items():
            rel = np.abs(getattr(m32[layer], name) - value).max() / np.abs(value).max()
            assert rel < 1e-5, (layer, name, rel)


def test_float32_products_leave_sxx_the_rank_of_its_texts(tiny_llama):
    """Sxx of N < d texts has rank at most N: with float32 products the text-level products stay float64
    (`TEXT_PRODUCTS`), so no eigenvalue of rounding size is retained as a direction and the theory NTPS
    is the float64 extraction's to rounding. (Formed in float32, as in extraction version 1, Sxx of these
    40 texts at d = 64 kept 40 directions at the embeddings, where float64 keeps 21: this test fails there.)
    The classes have distinct sizes: where the labels are fitted exactly, classes of equal size are
    tied and rounding orders them, whatever the precision."""
    from ntps_nb.core.intervals import theory_values
    from ntps_nb.core.score import theory_geometry

    model, tok, _ = tiny_llama
    texts = [f"{TEXTS[i % len(TEXTS)]} (copy {i}, take {i * 7 % 13})" for i in range(40)]
    labels = [0] * 20 + [1] * 13 + [2] * 7
    m32 = extract(model, tok, (texts, labels), precision="float32", progress=False).moments
    m64 = extract(model, tok, (texts, labels), precision="float64", progress=False).moments
    ks = np.arange(1, 33)
    for layer in m32:
        assert m32[layer].d == 64 and m32[layer].n_texts == 40
        g32, g64 = theory_geometry(m32[layer]), theory_geometry(m64[layer])
        assert g32.r_U == g64.r_U <= 40, layer
        np.testing.assert_allclose(theory_values(g32, ks), theory_values(g64, ks), rtol=0, atol=1e-3,
                                   err_msg=str(layer))


def test_float64_pooled_features_keep_float64_precision(llama64):
    """``pooled_dtype="float64"``: the pooled features are each text's float64 mean, not a float32 rounding of it."""
    model, tok, _ = llama64
    result = extract(model, tok, (TEXTS, LABELS), batch_size=4, precision="float64", pooled_layers="all",
                     pooled_dtype="float64", progress=False)
    _, states = brute_force(model, tok, TEXTS, LABELS)
    for layer, per_text in enumerate(states):
        pooled = np.stack([h.mean(axis=0) for h in per_text])
        np.testing.assert_allclose(result.pooled[layer], pooled, rtol=0, atol=STREAM_RTOL * np.abs(pooled).max())


def test_auto_pooled_features_are_the_vectors_sxx_is_formed_from(tiny_llama):
    """``pooled_dtype="auto"`` keeps the features at the token products' precision: whether a "float32" pass
    forms them in float64 (few pairs) or float32, Sxx is the mean outer product of the returned features to
    float64 rounding (with float32 features of a float64 mean it would be ~1e-8 off)."""
    model, tok, _ = tiny_llama
    for data, expected in (((TEXTS, LABELS), "float64"), ((TEXTS * 4, LABELS * 4), "float32")):
        result = extract(model, tok, data, precision="float32", pooled_layers="all", pooled_dtype="auto",
                         progress=False)
        assert result.metadata["token_precision"] == expected
        for layer in result.moments:
            X = result.pooled[layer]
            assert X.dtype == np.dtype(expected)
            X = X.astype(np.float64)
            np.testing.assert_allclose(result.moments[layer].Sxx, X.T @ X / len(X), rtol=0,
                                       atol=1e-13 * np.abs(X.T @ X / len(X)).max(), err_msg=f"{expected} {layer}")


def test_a_pass_of_few_token_pairs_forms_its_token_products_in_float64():
    """Under "float32", a pass of at most FLOAT64_TOKEN_PAIRS_PER_DIM x d token pairs forms C0 and C1 in float64."""
    d = 64
    limit = FLOAT64_TOKEN_PAIRS_PER_DIM * d
    assert token_precision("float32", limit, d) == "float64" and token_precision("float32", limit + 1, d) == "float32"
    assert token_precision("float64", 10 * limit, d) == "float64"
    with pytest.raises(ValueError, match="resolved"):
        token_precision("auto", 10, d)


def test_the_fewest_pairs_read_are_a_half_of_the_shards_less_one():
    """With S >= 4 shards the smallest part read is a half of the split less a shard: at least the S // 2 - 1
    shards with the fewest pairs (checked against every split into halves of sizes S // 2 and S - S // 2, less
    each of its shards); with 2 or 3 the pass less its largest shard; without shards the pass."""
    import itertools

    rng = np.random.default_rng(0)
    for n_shards in (4, 5, 6, 9):
        pairs = rng.integers(50, 500, size=n_shards)
        smallest = min(pairs[list(half)].sum() - pairs[drop] for half in itertools.combinations(range(n_shards),
                       n_shards // 2) for drop in half)
        assert fewest_pairs_read(pairs) == smallest  # the bound is reached by the split of the smallest shards
    assert fewest_pairs_read([10, 20, 30]) == 30 and fewest_pairs_read([10, 20]) == 10 and fewest_pairs_read([50]) == 50


def test_a_sharded_pass_reads_its_smallest_part_for_the_token_precision(tiny_llama):
    """44 texts have more pairs than 4 d at d = 64 (float32 token products), but in 4 shards a half less a shard
    is a single shard, with fewer: the pass forms its token products in float64."""
    model, tok, _ = tiny_llama
    data = (TEXTS * 4, LABELS * 4)
    whole = extract(model, tok, data, precision="float32", progress=False, layers=[0])
    sharded = extract(model, tok, data, precision="float32", progress=False, layers=[0], shards=4)
    assert whole.moments[0].n_tokens > FLOAT64_TOKEN_PAIRS_PER_DIM * 64 >= max(s[0].n_tokens for s in sharded.shards)
    assert (whole.metadata["token_precision"], sharded.metadata["token_precision"]) == ("float32", "float64")


def test_float32_leaves_c0_of_fewer_token_pairs_than_d_its_rank(tiny_llama):
    """C0 is the mean of one outer product a (prefix, next state) pair: its rank is at most the pairs.
    Formed in float32 (extraction version 2, or FLOAT64_TOKEN_PAIRS_PER_DIM = 0), C0 of these 30 pairs at
    d = 64 kept 43 / 46 / 47 directions by layer (rounding eigenvalues above RANGE_RTOL) where float64 keeps
    22 / 30 / 30; under "float32" such a pass now forms its token products in float64, so it is the float64
    extraction to the letter. The rank is checked against the distinct token prefixes among the pairs (identical
    prefixes give identical prefix vectors; beyond the embeddings a random model's states of distinct prefixes are
    in general position)."""
    from ntps_nb.batching import pooling_tokens
    from ntps_nb.core.score import next_token_subspace

    model, tok, _ = tiny_llama
    words = "red green blue small large quick slow bright dark warm cold soft loud".split()
    texts = [" ".join(words[(j * i + j + i) % len(words)] for j in (1, 3, 5, 7)) for i in range(10)]
    labels = [0] * 5 + [1] * 3 + [2] * 2
    e32 = extract(model, tok, (texts, labels), precision="float32", progress=False)
    e64 = extract(model, tok, (texts, labels), precision="float64", progress=False)
    assert e32.metadata["precision"] == "float32" and e32.metadata["token_precision"] == "float64"
    ids, starts, lengths = pooling_tokens(tok, texts, 256, drop_bos=True)
    prefixes = len({tuple(ids[i][:starts[i] + j + 1]) for i in range(len(texts)) for j in range(lengths[i] - 1)})
    for layer in e32.moments:
        m32, m64 = e32.moments[layer], e64.moments[layer]
        assert m32.n_tokens == int((e32.lengths - 1).sum()) < m32.d
        rank = next_token_subspace(m32).rank_B
        assert rank == next_token_subspace(m64).rank_B <= prefixes <= m32.n_tokens, layer
        if layer > 0:  # the embeddings' prefix vectors are sums of token embeddings: fewer directions
            assert rank == prefixes, layer
        for name, value in m64.arrays().items():
            np.testing.assert_array_equal(getattr(m32, name), value, err_msg=f"{layer} {name}")


def few_word_texts(n=200, seed=0):
    """``n`` texts of 6-11 words from 8 (fewer distinct tokens than the tiny models' d = 64) and 3 labels."""
    words = "red green blue small large quick slow dark".split()
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(words, size=rng.integers(6, 12))) for _ in range(n)]
    return texts, rng.integers(0, 3, size=n).tolist()


def test_float32_products_where_c0_is_rank_deficient_are_formed_again_in_float64(tiny_llama):
    """Texts of 8 distinct words: C0 at the embedding layer (prefix sums of token embeddings) spans at most the
    tokens met, fewer than d = 64, and float32 token products (a shard has more pairs than 4 d) leave a rounding
    error spread about zero: negative eigenvalues, which exact products cannot have, and positive ones in C0's
    null directions that the range tolerance would keep as directions of V (r_V above C0's rank). The pass
    records the reach and forms that layer's products again in float64: its moments, shards, halves and pooled
    features are then a float64 extraction's; the other layers keep their float32 products."""
    from ntps_nb.core.score import next_token_subspace
    from ntps_nb.extract import token_rounding

    model, tok, _ = tiny_llama
    texts, labels = few_word_texts()
    run = dict(progress=False, shards=4, half_layers=[0, 1], pooled_layers="all", pooled_dtype="auto")
    first32 = extract(model, tok, (texts, labels), precision="float32", layers=[0], **{**run, "half_layers": [0]})
    e32 = extract(model, tok, (texts, labels), precision="float32", **run)
    e64 = extract(model, tok, (texts, labels), precision="float64", **run)
    assert e32.metadata["token_precision"] == "float32" and e32.metadata["float64_layers"] == [0]
    reach = e32.metadata["token_rounding"]
    assert set(reach) == {str(layer) for layer in e32.moments} and reach["1"] == reach["2"] == 0.0
    assert reach["0"] > 1e-10 and e64.metadata["token_rounding"] is None and e64.metadata["float64_layers"] == []
    assert token_rounding(e64.moments[0].C0) == 0.0
    # what the first pass had at layer 0 (a pass of that layer alone is passed again too: its products are undone)
    assert first32.metadata["float64_layers"] == [0]
    assert set(first32.metadata["timings_s"]) >= {"rounding_check", "float64_pass"}
    for got, want in [(e32.moments, e64.moments), *zip(e32.shards, e64.shards), *zip(e32.halves, e64.halves)]:
        for name, value in want[0].arrays().items():
            np.testing.assert_allclose(getattr(got[0], name), value, rtol=1e-12, atol=0, err_msg=name)
        assert not np.array_equal(got[1].C0, want[1].C0)  # float32 products at layer 1
    assert e32.pooled[0].dtype == np.float64 and e32.pooled[1].dtype == np.float32
    np.testing.assert_array_equal(e32.pooled[0], e64.pooled[0])
    for layer in e32.moments:
        assert next_token_subspace(e32.moments[layer]).rank_B == next_token_subspace(e64.moments[layer]).rank_B


def test_auto_precision_is_float64_where_float64_is_cheap(tiny_llama, monkeypatch):
    model, tok, _ = tiny_llama
    assert extract(model, tok, (TEXTS[:3], LABELS[:3]), progress=False).metadata["precision"] == "float64"  # CPU
    assert resolve_precision("float32", "cpu") == "float32"
    assert resolve_precision("auto", "mps") == "float32"  # no float64 there
    for capability, expected in (((9, 0), "float64"), ((8, 0), "float64"), ((8, 9), "float32"), ((12, 0), "float32")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert resolve_precision("auto", "cuda:0") == expected, capability


def test_extraction_on_mps_says_it_needs_float64(tiny_llama):
    """MPS has no float64, in which the moments are summed on the device: a clear error before any work."""
    model, tok, _ = tiny_llama
    with pytest.raises(ValueError, match="MPS does not have: extract with device='cpu'"):
        extract(model, tok, (TEXTS, LABELS), device="mps", progress=False)


def test_texts_of_one_token_only_pool(llama64):
    model, tok, _ = llama64
    texts = ["ok", "fine", "The film was fine.", "Bad."]
    ids = tokenize(tok, texts, 256)
    result = extract(model, tok, (texts, [0, 1, 0, 1]), precision="float64", progress=False)
    assert result.moments[1].n_tokens == sum(len(t) - 1 for t in ids)
    truncated = extract(model, tok, (texts, [0, 1, 0, 1]), max_length=1, precision="float64", progress=False)
    assert truncated.moments[1].n_tokens == 0
    assert truncated.metadata["max_length"] == 1


def test_shards_combine_to_the_full_moments(tiny_llama):
    model, tok, _ = tiny_llama
    result = extract(model, tok, (TEXTS, LABELS), shards=3, shard_layers=[1, 2], progress=False)
    assert len(result.shards) == 3
    assert sorted(s.n_texts for s in result.shards) == [3, 4, 4]
    merged = LayerMoments.combine(result.shards)
    for layer in (1, 2):
        assert merged[layer].Shh is None  # shards carry every moment but Shh (intervals do not use it)
        full = dataclasses.replace(result.moments[layer], Shh=None)
        assert_moments_close(merged[layer], full, rtol=1e-12)


# labels that the texts carry (their first sentence's), in classes of unequal sizes: the perception
# eigenvalues (the class shares where the states separate the classes) do not tie, so rounding (a sum
# in another order) moves NTPS by ~1e-15; tied shares leave the top-k_U directions to rounding
HALF_TEXTS = [f"{a} {b} {c}" for a in TEXTS[:8] for b in ("indeed", "not really", "maybe so", "sure")
              for c in ("yes.", "no!", "fine")]
HALF_LABELS = [(0, 0, 0, 0, 1, 1, 1, 2)[i // 12] for i in range(len(HALF_TEXTS))]  # unequal classes: no tie in U


@pytest.fixture(scope="module")
def with_halves(tiny_llama):
    model, tok, _ = tiny_llama
    return extract(model, tok, (HALF_TEXTS, HALF_LABELS), shards=6, shard_seed=3, half_layers=[2], half_seed=5,
                   batch_size=4, progress=False)


def test_halves_are_the_unions_of_the_shards_of_each_half(with_halves):
    from ntps_nb.core.estimators import estimate_ntps, split_halves
    from ntps_nb.core.moments import Moments

    result = with_halves
    assert len(result.halves) == 2 and all(half.layers == [2] for half in result.halves)
    assert result.halves[0].n_texts + result.halves[1].n_texts == len(HALF_TEXTS)
    for half, shard_ids in zip(result.halves, split_halves(6, seed=5)):
        assert half.metadata["shards_of_half"] == shard_ids.tolist()
        union = Moments.combine([result.shards[i][2] for i in shard_ids])  # independent: the per-shard sums
        assert half[2].Shh is None
        assert_moments_close(half[2], union, rtol=1e-12)
    # the halves as two shards: richardson of the full sample, as from the six shards
    ks = np.arange(1, 9)
    from_shards = estimate_ntps([s[2] for s in result.shards], ks, estimator="richardson", seed=5).estimate
    from_halves = estimate_ntps([h[2] for h in result.halves], ks, estimator="richardson", seed=5).estimate
    assert np.isfinite(from_shards).sum() >= 4
    np.testing.assert_allclose(from_halves, from_shards, rtol=1e-12, atol=1e-12)
    # another split seed gives other halves
    assert not np.allclose(estimate_ntps([s[2] for s in result.shards], ks, estimator="richardson",
                                         seed=6).estimate, from_shards, equal_nan=True)


def test_halves_round_trip_through_the_cache_and_leave_other_keys_alone(tiny_llama, tmp_path):
    from ntps_nb.extract import _settings_with_defaults

    model, tok, info = tiny_llama
    plain = dict(max_length=32, shards=3, progress=False)
    # without halves the key is the one of the settings before halves existed
    assert _settings_with_defaults(plain) == _settings_with_defaults({**plain, "half_layers": None, "half_seed": 4})
    assert "half_layers" not in _settings_with_defaults(plain)
    first = extract_cached(model, tok, info, (TEXTS, LABELS), cache=tmp_path, half_layers=[1, 2], half_seed=2,
                           shard_layers=[], **plain)
    assert first.shards is None and first.metadata["half_layers"] == [1, 2]  # no shard layers: halves only
    extract_cached(model, tok, info, (TEXTS, LABELS), cache=tmp_path, **plain)
    extract_cached(model, tok, info, (TEXTS, LABELS), cache=tmp_path, half_layers=[1, 2], half_seed=3,
                   shard_layers=[], **plain)
    assert len(list(tmp_path.iterdir())) == 3  # halves, their seed: each its own entry
    again = Extraction.load(tmp_path / first.metadata["cache_key"])
    for got, want in zip(again.halves, first.halves, strict=True):
        assert got.layers == want.layers == [1, 2] and got.metadata["half"] == want.metadata["half"]
        for layer in (1, 2):
            for name, value in want[layer].arrays().items():
                np.testing.assert_array_equal(getattr(got[layer], name), value, err_msg=name)


def test_bad_input_gets_clear_errors(tiny_llama):
    model, tok, _ = tiny_llama
    with pytest.raises(ValueError, match="empty"):
        extract(model, tok, ([], []), progress=False)
    with pytest.raises(ValueError, match=r"no token to pool.*indices \[1\]"):
        extract(model, tok, (["fine", "", "bad"], [0, 1, 0]), progress=False)
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        extract(model, tok, (["a b", "c d"], [0, 5]), n_classes=2, progress=False)
    with pytest.raises(ValueError, match="integers"):
        extract(model, tok, (["a b", "c d"], ["pos", "neg"]), progress=False)
    with pytest.raises(ValueError, match="layers \\[7\\] do not exist"):
        extract(model, tok, (TEXTS, LABELS), layers=[0, 7], progress=False)
    with pytest.raises(ValueError, match="pooled_layers: layer -9 does not exist; the model has hidden states 0..2"):
        extract(model, tok, (TEXTS, LABELS), pooled_layers=[-9], progress=False)
    with pytest.raises(ValueError, match=r"half_layers \[2\] need shards >= 2"):
        extract(model, tok, (TEXTS, LABELS), half_layers=[2], progress=False)
    with pytest.raises(ValueError, match=r"half_layers \[3\] must be among the extracted layers"):
        extract(model, tok, (TEXTS, LABELS), layers=[1, 2], shards=2, half_layers=[3], progress=False)
    with pytest.raises(ValueError, match=r"the DataFrame needs columns 'text' and 'label', has \['sentence', 'y'\]"):
        extract(model, tok, pd.DataFrame({"sentence": TEXTS, "y": LABELS}), progress=False)
    with pytest.raises(ValueError, match=r"texts must be strings; entries \[0\] are not"):
        extract(model, tok, ([None, "c d"], [0, 1]), progress=False)


def test_a_mapping_of_columns_is_read_as_its_texts_and_labels(tiny_llama):
    model, tok, _ = tiny_llama
    from_tuple = extract(model, tok, (TEXTS, LABELS), progress=False)
    from_mapping = extract(model, tok, {"text": TEXTS, "label": LABELS}, progress=False)
    np.testing.assert_array_equal(from_mapping.labels, from_tuple.labels)
    for layer in from_tuple.moments.layers:
        for name, value in from_tuple.moments[layer].arrays().items():
            np.testing.assert_array_equal(getattr(from_mapping.moments[layer], name), value, err_msg=name)
    with pytest.raises(ValueError, match=r"the mapping needs keys 'text' and 'label', has \['sentence', 'y'\]"):
        extract(model, tok, {"sentence": TEXTS, "y": LABELS}, progress=False)
    from ntps_nb.datasets import from_pandas

    splits = from_pandas(pd.DataFrame({"text": TEXTS, "label": LABELS}), test_size=0.5)  # a DatasetDict
    with pytest.raises(ValueError, match=r"has \['train', 'test'\] \(the splits of a dataset: give one, e\.g\. "
                                         r"data\['train'\]\)"):
        extract(model, tok, splits, progress=False)
    with pytest.raises(TypeError, match="a mapping with keys 'text' and 'label'.*got list"):
        extract(model, tok, list(zip(TEXTS, LABELS)), progress=False)


def test_nan_hidden_states_name_the_layer(tiny_gpt2):
    model, tok, _ = tiny_gpt2
    block = model.transformer.h[1]
    handle = block.register_forward_hook(lambda mod, inp, out: (out[0] * float("nan"),) + tuple(out[1:])
                                         if isinstance(out, tuple) else out * float("nan"))
    try:
        with pytest.raises(ValueError, match="layer 2 contain NaN"):
            extract(model, tok, (TEXTS, LABELS), progress=False)
    finally:
        handle.remove()


def test_model_without_hidden_states_is_refused(tiny_llama):
    model, tok, _ = tiny_llama

    class NoHidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model
            self.config = model.config  # the layout says 3 hidden states; the forward returns none

        def forward(self, **kwargs):
            out = model(**kwargs)
            out.hidden_states = None
            return out

    with pytest.raises(ValueError, match="no hidden states"):
        extract(NoHidden(), tok, (TEXTS, LABELS), progress=False)


def test_negative_layers_count_from_the_last_and_name_the_same_cache_entry(tiny_llama, tmp_path):
    model, tok, info = tiny_llama
    last = max(hidden_state_layers(model))
    given = extract_cached(model, tok, info, (TEXTS, LABELS), cache=tmp_path, layers=[-1, 0], pooled_layers=[-1],
                           shards=2, shard_layers=[-1], progress=False)
    assert given.moments.layers == [0, last] and list(given.pooled) == [last]
    assert given.shards[0].layers == [last]
    again = extract_cached(model, tok, info, (TEXTS, LABELS), cache=tmp_path, layers=[0, last], pooled_layers=[last],
                           shards=2, shard_layers=[last], progress=False)
    assert len(list(tmp_path.iterdir())) == 1  # one entry: -1 is the last index
    np.testing.assert_array_equal(again.pooled[last], given.pooled[last])


def test_cache_round_trip_and_interrupted_write(tiny_llama, tmp_path, monkeypatch):
    model, tok, info = tiny_llama
    first = extract_cached(model, tok, info, (TEXTS, LABELS), cache=tmp_path, max_length=32,
                           pooled_layers=[2], progress=False)
    entries = list(tmp_path.iterdir())
    assert len(entries) == 1
    calls = []
    monkeypatch.setattr("ntps_nb.extract.extract", lambda *a, **k: calls.append(1))
    again = extract_cached(model, tok, info, (TEXTS, LABELS), cache=tmp_path, max_length=32,
                           pooled_layers=[2], progress=False)
    assert calls == []
    explicit_defaults = extract_cached(model, tok, info, (TEXTS, LABELS), cache=tmp_path, max_length=32,
                                       pooled_layers=[2], progress=False, drop_bos=True, batch_size=16,
                                       precision="float64")  # what "auto" means on a CPU: the same entry
    assert calls == [] and len(list(tmp_path.iterdir())) == 1
    np.testing.assert_array_equal(explicit_defaults.moments[2].C0, first.moments[2].C0)
    np.testing.assert_array_equal(again.moments[2].C1, first.moments[2].C1)
    np.testing.assert_array_equal(again.pooled[2], first.pooled[2])
    assert ntps(again.moments[2], 4) == ntps(first.moments[2], 4)
    monkeypatch.undo()

    # a different setting is a different entry; an interrupted save leaves nothing that loads
    def broken_save(self, folder):
        from ntps_nb.cache import atomic_path

        with atomic_path(folder, directory=True) as tmp:
            (tmp / "moments.npz").write_bytes(b"half")
            raise KeyboardInterrupt

    monkeypatch.setattr(Extraction, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        extract_cached(model, tok, info, (TEXTS, LABELS), cache=tmp_path, max_length=16, progress=False)
    assert list(tmp_path.iterdir()) == entries
    monkeypatch.undo()

    # an entry damaged after it was written (a truncated file) is named, with what to do (it was "BadZipFile:
    # File is not a zip file"), and left as it is
    moments = entries[0] / "moments.npz"
    moments.write_bytes(moments.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"the cached extraction {entries[0]} cannot be read .BadZipFile.*delete that"):
        extract_cached(model, tok, info, (TEXTS, LABELS), cache=tmp_path, max_length=32, pooled_layers=[2],
                       progress=False)
    assert moments.stat().st_size == 100


def test_extraction_computes_logits_for_one_position_only(llama64):
    """The vocabulary matmul is skipped for all but the last position (logits_to_keep=1); the
    moments still equal brute force, which runs the plain forward with every logit."""
    model, tok, _ = llama64
    seen = []
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    try:
        ours = extract(model, tok, (TEXTS, LABELS), batch_size=4, precision="float64", progress=False)
    finally:
        handle.remove()
    assert seen and all(shape[1] == 1 for shape in seen), seen
    theirs, _ = brute_force(model, tok, TEXTS, LABELS)
    assert_moments_close(ours.moments[2], theirs[2])


@pytest.mark.filterwarnings("ignore:.*resamples had undefined geometry")
def test_moments_kept_on_the_device_are_read_in_place_and_go_with_their_arrays(tiny_llama, tmp_path):
    """keep_on_device: every finalised moment (all layers, the shards) stays as the resident copy of
    its host array; the torch backend reads that copy instead of copying the array (here on the CPU
    the two share memory), with the same numbers; it is no part of the cache key; and the copies go
    when the extraction is freed."""
    import gc

    from ntps_nb.core.backends import torch as backend
    from ntps_nb.extract import _settings_with_defaults

    model, tok, _ = tiny_llama
    options = dict(shards=3, shard_layers=[1, 2], progress=False)
    plain = extract(model, tok, (TEXTS, LABELS), **options)
    kept = extract(model, tok, (TEXTS, LABELS), keep_on_device=True, **options)
    before = len(backend._RESIDENT)
    for m in [*(kept.moments[layer] for layer in kept.moments.layers), *(s[1] for s in kept.shards)]:
        for name in ("Sxx", "Sxy", "C0", "C1", "x_mean"):
            array = getattr(m, name)
            copy = backend.resident(array)
            assert copy is not None and np.array_equal(copy.numpy(), array), name
            assert backend._tensor(array, torch.float64, torch.device("cpu")).data_ptr() == copy.data_ptr()
    assert backend.resident(plain.moments[1].Sxx) is None
    assert backend._tensor(plain.moments[1].Sxx, torch.float64, torch.device("cpu")).data_ptr() != \
        plain.moments[1].Sxx.__array_interface__["data"][0]
    for layer in (1, 2):
        want = backend.ntps_sweep_torch(plain.moments[layer], device="cpu")
        got = backend.ntps_sweep_torch(kept.moments[layer], device="cpu")
        np.testing.assert_array_equal(got["ntps"].to_numpy(), want["ntps"].to_numpy())
    want = backend.interval_sweep_torch([s[2] for s in plain.shards], n_boot=5, device="cpu")
    got = backend.interval_sweep_torch([s[2] for s in kept.shards], n_boot=5, device="cpu")
    np.testing.assert_array_equal(got["upper"].to_numpy(), want["upper"].to_numpy())
    assert _settings_with_defaults({"keep_on_device": True}) == _settings_with_defaults({})
    del kept, m, array, copy
    gc.collect()
    assert len(backend._RESIDENT) < before and all(ref() is not None for ref, _ in backend._RESIDENT.values())


def test_an_entry_loaded_from_the_cache_is_kept_on_the_device_as_a_fresh_one(tiny_llama, tmp_path):
    """extract_cached(keep_on_device=True) on a cache hit records a resident copy of every moment a fresh
    extraction keeps (every layer's, the shards', the halves'); on the CPU it shares the array's memory, so
    the backend reads it in place. Without keep_on_device a loaded entry has none."""
    from ntps_nb.core.backends import torch as backend

    model, tok, info = tiny_llama
    options = dict(max_length=32, shards=4, shard_layers=[1], half_layers=[2], progress=False)
    extract_cached(model, tok, info, (TEXTS, LABELS), cache=tmp_path, **options)  # writes the entry
    plain = extract_cached(model, tok, info, (TEXTS, LABELS), cache=tmp_path, **options)
    kept = extract_cached(model, tok, info, (TEXTS, LABELS), cache=tmp_path, keep_on_device=True, **options)
    assert len(list(tmp_path.iterdir())) == 1  # both read the one entry
    parts = [kept.moments, *kept.shards, *kept.halves]
    assert len(parts) == 1 + 4 + 2
    n_kept = 0
    for layer_moments in parts:
        for layer in layer_moments.layers:
            for name in ("Sxx", "Sxy", "C0", "C1", "x_mean"):
                array = getattr(layer_moments[layer], name)
                copy = backend.resident(array)
                assert copy is not None and copy.device.type == "cpu", name
                assert copy.data_ptr() == array.__array_interface__["data"][0]  # the same memory
                assert backend._tensor(array, torch.float64, torch.device("cpu")).data_ptr() == copy.data_ptr()
                n_kept += 1
    assert n_kept == 5 * (len(kept.moments.layers) + 4 + 2)
    for layer_moments in [plain.moments, *plain.shards, *plain.halves]:
        for layer in layer_moments.layers:
            assert all(backend.resident(getattr(layer_moments[layer], name)) is None
                       for name in ("Sxx", "Sxy", "C0", "C1", "x_mean"))
    want = backend.ntps_sweep_torch(plain.moments[2], device="cpu")
    got = backend.ntps_sweep_torch(kept.moments[2], device="cpu")
    np.testing.assert_array_equal(got["ntps"].to_numpy(), want["ntps"].to_numpy())


def test_moments_are_kept_on_the_models_gpu_only(monkeypatch):
    """keeps_moments_on_device: only for an analysis on the model's own CUDA device ("cuda" is the current
    one), and only where 4 d x d matrices a layer, 3 a shard and layer, 3 a half and layer fit in
    RESIDENT_MEMORY_SHARE of its memory."""
    from types import SimpleNamespace

    from ntps_nb.extract import RESIDENT_MEMORY_SHARE, keeps_moments_on_device

    d, settings = 64, dict(shards=10, shard_layers=[1, 2], half_layers=[0, 3, 4])
    nbytes = 8 * d * d * (4 * 5 + 3 * 10 * 2 + 3 * 2 * 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # two CUDA devices, the current one cuda:1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    limit = nbytes / RESIDENT_MEMORY_SHARE
    for total, fits in ((limit * 1.001, True), (limit * 0.999, False)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, total=total: SimpleNamespace(
            total_memory=total))
        for analysis, model, want in (("cuda:1", "cuda:1", fits), ("cuda", "cuda:1", fits), ("cuda:1", "cuda", fits),
                                      ("cuda", "cuda:0", False), ("cuda:0", "cuda:1", False), ("cpu", "cpu", False),
                                      (None, "cuda:1", False), ("cuda:1", "cpu", False)):
            assert keeps_moments_on_device(analysis, torch.device(model), d, 5, settings) is want, (analysis, model)
    assert not keeps_moments_on_device("cuda:1", "cuda:1", None, 5, settings)  # hidden size unknown
