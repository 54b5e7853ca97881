"""A model name with the same weights can come with another tokenizer (a GGUF's tokenizer rebuilt
by another transformers version: Gemma-3's lost its BOS and half its merges under 5.17). The
tokenizer's fingerprint is recorded, and results made with another one are refused: by the
extraction cache, by a unit whose stored stages came from elsewhere, and by `study combine`."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from ntps_nb import study
from ntps_nb.extract import TokenizerMismatchError, extract_cached
from ntps_nb.models import TOKENIZER_PROBES, tokenizer_fingerprint

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["a short text", "another one here", "the third text", "and a fourth"]
LABELS = [0, 1, 0, 1]


def test_the_fingerprint_changes_with_what_the_tokenizer_does_and_only_then(tiny_llama):
    _, tok, info = tiny_llama
    assert info.tokenizer_sha256 == tokenizer_fingerprint(tok) and len(info.tokenizer_sha256) == 64
    other_pad = copy.deepcopy(tok)
    other_pad.pad_token = other_pad.bos_token  # padded positions are masked: not part of the identity
    assert tokenizer_fingerprint(other_pad) == info.tokenizer_sha256
    word = "Vodafone"
    assert any(word in text for text in TOKENIZER_PROBES)
    merged = copy.deepcopy(tok)
    before = [merged(text)["input_ids"] for text in TOKENIZER_PROBES]
    merged.add_tokens([word])  # the word becomes one token: the probes tokenise differently
    assert [merged(text)["input_ids"] for text in TOKENIZER_PROBES] != before
    assert tokenizer_fingerprint(merged) != info.tokenizer_sha256


def test_the_extraction_cache_refuses_an_entry_made_with_another_tokenizer(tiny_llama, tmp_path):
    model, tok, info = tiny_llama
    settings = dict(max_length=16, progress=False, cache=tmp_path)
    first = extract_cached(model, tok, info, (TEXTS, LABELS), **settings)
    assert first.metadata["model"]["tokenizer_sha256"] == info.tokenizer_sha256
    elsewhere = dataclasses.replace(info, tokenizer_sha256="f" * 64)  # same weights, another tokenizer
    with pytest.raises(TokenizerMismatchError, match="another tokenizer"):
        extract_cached(model, tok, elsewhere, (TEXTS, LABELS), **settings)
    assert (tmp_path / first.metadata["cache_key"] / "extraction.json").is_file()  # the entry is kept
    unknown = dataclasses.replace(info, tokenizer_sha256="")  # a caller without a fingerprint: not compared
    assert extract_cached(model, tok, unknown, (TEXTS, LABELS), **settings).metadata["cache_key"] == \
        first.metadata["cache_key"]


def _smoke(tmp_path):
    return study.load_config(ROOT / "studies" / "smoke.toml", results_dir=str(tmp_path / "results"),
                             datasets=["trec6", "sms-spam"], diagnostics=False, shards=0, peers=False)


def _edit_model_info(cfg, model, dataset, **fields):
    path = cfg.unit_folder(model, dataset) / "unit.json"
    meta = json.loads(path.read_text())
    for name, value in fields.items():
        if value is None:
            meta["model_info"].pop(name, None)
        else:
            meta["model_info"][name] = value
    path.write_text(json.dumps(meta))


def test_units_of_one_model_with_other_tokenizers_do_not_share_a_table(tmp_path, tiny_llama):
    cfg = _smoke(tmp_path)
    study.run_study(cfg, cache=tmp_path / "cache", log=lambda _: None)
    (model, first), (_, second) = cfg.units()
    meta = json.loads((cfg.unit_folder(model, first) / "unit.json").read_text())
    assert meta["model_info"]["tokenizer_sha256"] == tiny_llama[2].tokenizer_sha256
    study.combine(cfg, log=lambda _: None)

    _edit_model_info(cfg, model, second, tokenizer_sha256="f" * 64)
    with pytest.raises(study.StudySettingsError, match="tokenizer_sha256"):
        study.combine(cfg, log=lambda _: None)
    with pytest.raises(study.StudySettingsError, match="tokenizer_sha256"):
        study.load_units(cfg)
    _edit_model_info(cfg, model, second, tokenizer_sha256=None)  # a unit written before the fingerprint
    study.combine(cfg, log=lambda _: None)
    # what such a unit still records: whether the tokenizer puts a BOS in front (Gemma-3's lost it)
    _edit_model_info(cfg, model, second, adds_bos=not meta["model_info"]["adds_bos"])
    with pytest.raises(study.StudySettingsError, match="adds_bos"):
        study.combine(cfg, log=lambda _: None)


def test_a_unit_refuses_stored_stages_made_with_another_tokenizer(tmp_path, tiny_llama):
    cfg = _smoke(tmp_path)
    study.run_study(cfg, cache=tmp_path / "cache", log=lambda _: None)
    model, dataset = cfg.units()[0]
    records = list((cfg.folder / "stages").glob(f"*{dataset}*/extraction-*/record.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["tokenizer_sha256"] == tiny_llama[2].tokenizer_sha256
    records[0].write_text(json.dumps({**record, "tokenizer_sha256": "f" * 64}))  # computed on another machine
    study.run_study(cfg, cache=tmp_path / "cache", log=lambda _: None)  # complete units are not reassembled
    import shutil

    shutil.rmtree(cfg.unit_folder(model, dataset))  # the stages remain; the unit is assembled again
    with pytest.raises(TokenizerMismatchError, match="another tokenizer"):
        study.run_study(cfg, cache=tmp_path / "cache", log=lambda _: None)
