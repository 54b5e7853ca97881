"""LoRA fine-tuning on tiny models: learning, merge equivalence, cache identity, resume, bad inputs."""

import numpy as np
import pandas as pd
import pytest
import torch

from ntps_nb.extract import extract_cached
from ntps_nb.lora import (
    LoraResult,
    adapter_model,
    finetune_lora,
    lora_gain,
    merged_model,
    ntps_before_after,
    pooled_last_hidden,
)
from ntps_nb.models import load_model

# Tiny models on a shared 2-core machine: one thread avoids oversubscription (measured 25x faster).
FAST = dict(batch_size=8, lr=1e-2, optimizer="adamw", progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def first_word_task(n, seed):
    """Labels decided by the first word; the rest of the text is shared noise."""
    rng = np.random.default_rng(seed)
    cue = ["apple", "river", "stone"]
    tails = ["the cat sat on the mat", "a dog ran far away", "we like green tea", "it rains in spring",
             "numbers are fun to add", "the train left at noon"]
    labels = rng.integers(0, 3, n)
    texts = [f"{cue[y]} {tails[rng.integers(len(tails))]}" for y in labels]
    return texts, labels


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama", seed=0)  # our own copy: training never touches the shared fixture


@pytest.fixture(scope="module")
def task():
    return first_word_task(48, 0), first_word_task(24, 1)


@pytest.fixture(scope="module")
def trained(llama, task, tmp_path_factory):
    train, test = task
    return finetune_lora(llama, train, test, steps=30, cache=tmp_path_factory.mktemp("lora"), **FAST)


def test_training_loss_decreases_and_task_is_learned(trained, llama):
    loss = trained.train_loss
    assert loss.shape == (30,)
    assert loss[-5:].mean() < 0.3 * loss[:5].mean()
    assert trained.accuracy >= 0.9
    assert trained.budget["steps"] == 30 and trained.budget["batch_size"] == 8
    row = trained.row()
    assert row["paper_steps"] == 5000 and row["paper_batch_size"] == 1 and row["budget_max_length"] == 64
    assert trained.settings["target_modules"] == ["q_proj", "k_proj", "v_proj"]


def test_a_damaged_cache_entry_is_named_and_left_as_it_is(trained, llama, task, tmp_path):
    import shutil

    train, test = task
    entry = tmp_path / trained.folder.name
    shutil.copytree(trained.folder, entry)
    assert finetune_lora(llama, train, test, steps=30, cache=tmp_path, **FAST).folder == entry  # read back
    (entry / "predictions.npy").write_bytes(b"\x93NUMPY")  # truncated
    with pytest.raises(ValueError, match=f"the cached LoRA result {entry} cannot be read .* delete that folder"):
        finetune_lora(llama, train, test, steps=30, cache=tmp_path, **FAST)
    assert (entry / "predictions.npy").read_bytes() == b"\x93NUMPY"


def test_global_rng_and_given_model_are_left_alone(llama, task, tmp_path):
    train, test = task
    state, weights = torch.get_rng_state(), {k: v.clone() for k, v in llama[0].state_dict().items()}
    finetune_lora(llama, train, test, steps=2, cache=False, **FAST)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(v, weights[k]) for k, v in llama[0].state_dict().items())


def test_merged_model_equals_adapter_model(trained, llama, task):
    adapted, tokenizer, _ = adapter_model(trained, llama)
    merged, _, merged_info = merged_model(trained, llama)
    assert type(merged) is type(llama[0])  # a plain model, no peft wrapper left
    texts, _ = task[1]
    batch = tokenizer(texts[:6], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = adapted(**batch, output_hidden_states=True)
        m = merged(**batch, output_hidden_states=True)
    torch.testing.assert_close(m.hidden_states[-1], a.hidden_states[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.logits, a.logits, atol=1e-5, rtol=1e-5)
    # and the adapter differs from the base, so the comparison is not vacuous
    with torch.no_grad():
        b = llama[0](**batch)
    assert (b.logits - m.logits).abs().max() > 1e-3
    # the head on the merged model's pooled states reproduces the stored test predictions
    ids = [tokenizer(t)["input_ids"] for t in texts]
    starts = [1 if t[0] == tokenizer.bos_token_id else 0 for t in ids]
    with torch.no_grad():
        predicted = trained.head()(pooled_last_hidden(merged, ids, starts, tokenizer.pad_token_id)).argmax(1)
    np.testing.assert_array_equal(predicted.numpy(), trained.predictions)


def test_merged_identity_keys_its_own_extraction(trained, llama, task, tmp_path):
    merged, tokenizer, merged_info = merged_model(trained, llama)
    base_info = llama[2]
    assert merged_info.weights_sha256 != base_info.weights_sha256
    train, _ = task
    # the keyword set ntps_before_after passes: extract_cached keys on the arguments as given
    settings = dict(cache=tmp_path, layers="all", max_length=64, batch_size=16, drop_bos=True, progress=False)
    before = extract_cached(llama[0], llama[1], base_info, train, **settings)
    after = extract_cached(merged, tokenizer, merged_info, train, **settings)
    entries = [p for p in tmp_path.iterdir() if (p / "extraction.json").is_file()]
    assert len(entries) == 2  # a cache that reused the base entry would hold one
    last = max(before.moments.layers)
    assert not np.allclose(before.moments[last].Sxx, after.moments[last].Sxx)
    np.testing.assert_allclose(before.moments[0].Sxx, after.moments[0].Sxx)  # embeddings are not adapted

    table = ntps_before_after(trained, train, k=[1, 2], base=llama, cache=tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 2  # same settings: both extractions came from the cache
    assert set(table["layer"]) == {0, 1, 2} and set(table["k"]) == {1, 2}
    assert table[["ntps_before", "ntps_after"]].apply(lambda c: c.between(0, 1 + 1e-9)).all().all()
    layer0 = table[table.layer == 0]
    np.testing.assert_allclose(layer0.ntps_before, layer0.ntps_after, atol=1e-9)
    assert (table.weights_after != table.weights_before).all()
    reference = ntps_before_after(trained, train, fraction=0.5, variant="reference", base=llama, cache=tmp_path,
                                  progress=False)
    assert set(reference["fraction"]) == {0.5} and reference["ntps_after"].notna().all()
    with pytest.raises(ValueError, match="exactly one of k"):
        ntps_before_after(trained, train, base=llama, cache=tmp_path)

    # the base side given (as a study does with its own extraction): only the merged model is extracted
    given = ntps_before_after(trained, train, k=[1, 2], base=llama, layers=[0, 1, 2], before=before.moments,
                              cache=tmp_path / "other", progress=False)
    pd.testing.assert_frame_equal(given.reset_index(drop=True), table.reset_index(drop=True))
    assert len(list((tmp_path / "other").iterdir())) == 1
    short = extract_cached(llama[0], llama[1], base_info, (train[0][:10], train[1][:10]), **settings)
    with pytest.raises(ValueError, match="same texts"):
        ntps_before_after(trained, train, k=1, base=llama, layers=[2], before=short.moments, cache=tmp_path)
    with pytest.raises(ValueError, match="no moments for layers"):
        ntps_before_after(trained, train, k=1, base=llama, layers=[7], before=before.moments, cache=tmp_path)


def test_gain_is_lora_minus_probe(trained, llama, task, tmp_path):
    train, test = task
    row = lora_gain(trained, train, test, base=llama, cache=tmp_path, progress=False)
    assert row["gain"] == pytest.approx(trained.accuracy - row["probe_accuracy"])
    # the per-text predictions recompute both accuracies exactly, text by text in test order
    per_text = row["predictions"]
    assert list(per_text.columns) == ["text_index", "label", "lora_prediction", "probe_prediction"]
    np.testing.assert_array_equal(per_text["label"], test[1])
    assert np.mean(per_text["lora_prediction"] == per_text["label"]) == trained.accuracy
    assert np.mean(per_text["probe_prediction"] == per_text["label"]) == row["probe_accuracy"]
    assert row["probe_protocol"] == "heldout" and row["probe_layer"] == llama[2].n_layers
    assert row["budget_steps"] == 30 and row["paper_steps"] == 5000
    with pytest.raises(ValueError, match="same splits"):
        lora_gain(trained, test, train, base=llama, cache=tmp_path, progress=False)
    last = llama[2].n_layers
    settings = dict(cache=tmp_path, layers=[last], pooled_layers=[last], token_moments=False, batch_size=16,
                    max_length=trained.settings["max_length"], drop_bos=trained.settings["drop_bos"], progress=False)
    pooled = [extract_cached(*llama, split, **settings).pooled[last] for split in (train, test)]
    given = lora_gain(trained, train, test, base=llama, base_features=pooled, cache=tmp_path / "unused",
                      progress=False)
    pd.testing.assert_frame_equal(given.pop("predictions"), row.pop("predictions"))
    assert given == row and not (tmp_path / "unused").exists()
    with pytest.raises(ValueError, match="one row per text"):
        lora_gain(trained, train, test, base=llama, base_features=(pooled[0][:5], pooled[1]), progress=False)


def test_resume_after_interruption_equals_uninterrupted(llama, task, tmp_path):
    train, test = task
    settings = dict(steps=20, checkpoint_every=5, **FAST)
    reference = finetune_lora(llama, train, test, cache=tmp_path / "a", **settings)

    class Stop(Exception):
        pass

    def stop_at_12(step, loss):
        if step == 12:
            raise Stop

    with pytest.raises(Stop):
        finetune_lora(llama, train, test, cache=tmp_path / "b", callback=stop_at_12, **settings)
    checkpoints = list((tmp_path / "b").glob("*.checkpoint.pt"))
    assert len(checkpoints) == 1 and not list((tmp_path / "b").glob("*/result.json"))
    assert torch.load(checkpoints[0], weights_only=True)["step"] == 10

    resumed = finetune_lora(llama, train, test, cache=tmp_path / "b", **settings)
    assert resumed.metadata["resumed_from_step"] == 10 and reference.metadata["resumed_from_step"] == 0
    assert resumed.key == reference.key
    np.testing.assert_allclose(resumed.train_loss, reference.train_loss, rtol=0, atol=1e-6)
    for name in reference.head_state:
        torch.testing.assert_close(resumed.head_state[name], reference.head_state[name], atol=1e-6, rtol=0)
    for name in reference.adapter_state:
        torch.testing.assert_close(resumed.adapter_state[name], reference.adapter_state[name], atol=1e-6, rtol=0)
    assert resumed.accuracy == reference.accuracy
    np.testing.assert_array_equal(resumed.predictions, reference.predictions)
    assert not list((tmp_path / "b").glob("*.checkpoint.pt"))

    cached = finetune_lora(llama, train, test, cache=tmp_path / "b", **settings)  # a hit: loads, no training
    assert cached.folder is not None and cached.metadata == resumed.metadata
    np.testing.assert_array_equal(cached.train_loss, resumed.train_loss)
    assert isinstance(LoraResult.load(cached.folder), LoraResult)


def test_gpt2_conv1d_attention_is_adapted_and_merges(tiny_gpt2, task):
    train, test = task
    result = finetune_lora(tiny_gpt2, train, test, steps=3, cache=False, **FAST)
    assert result.settings["target_modules"] == ["c_attn"] and result.settings["fan_in_fan_out"]
    adapted, tokenizer, _ = adapter_model(result, tiny_gpt2)
    merged, _, info = merged_model(result, tiny_gpt2)
    assert info.weights_sha256 != tiny_gpt2[2].weights_sha256
    batch = tokenizer(test[0][:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=1e-5)


def test_bad_inputs(llama, task):
    train, test = task
    texts, labels = train
    with pytest.raises(ValueError, match="single class"):
        finetune_lora(llama, (texts, np.zeros_like(labels)), test, steps=2, cache=False, **FAST)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        finetune_lora(llama, train, test, steps=0, cache=False, **FAST)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        finetune_lora(llama, train, test, steps=-3, cache=False, **FAST)
    with pytest.raises(ValueError, match=r"target modules \['nothing_here'\] match no module"):
        finetune_lora(llama, train, test, steps=2, target_modules=["nothing_here"], cache=False, **FAST)
    with pytest.raises(ValueError, match="optimizer"):
        finetune_lora(llama, train, test, steps=2, cache=False, **{**FAST, "optimizer": "sgd"})
    with pytest.raises(ValueError, match="labels must lie"):
        finetune_lora(llama, train, (test[0], test[1] + 5), steps=2, cache=False, **FAST)
    other = load_model("tiny-llama", seed=1)
    result = finetune_lora(llama, train, test, steps=1, cache=False, **FAST)
    with pytest.raises(ValueError, match="not the one this adapter was trained on"):
        merged_model(result, other)


def test_the_command_line_runs_on_the_device_it_is_given(monkeypatch, capsys):
    import json

    import ntps_nb.lora as lora_module
    from ntps_nb.cli import build_parser

    asked = []

    def recording_load_model(name, **kwargs):
        asked.append((name, kwargs))
        return load_model(name, **kwargs)

    monkeypatch.setattr(lora_module, "load_model", recording_load_model)
    args = build_parser().parse_args(["lora", "--model", "tiny-llama", "--max-train", "24", "--max-test", "12",
                                      "--steps", "2", "--max-length", "16", "--threads", "1", "--no-cache",
                                      "--device", "cpu"])
    assert args.func(args) == 0
    assert asked == [("tiny-llama", {"device": "cpu"})]
    row = json.loads(capsys.readouterr().out)
    settings = (row["dataset"], row["device"], row["n_train"], row["n_test"], row["budget_steps"])
    assert settings == ("trec6", "cpu", 24, 12, 2)
    assert row["gain"] == pytest.approx(row["lora_accuracy"] - row["probe_accuracy"])
