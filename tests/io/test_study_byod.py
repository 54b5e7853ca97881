"""Your model, your data: a study config takes data files ([[datasets]] tables, read through
`ntps_nb.datasets.from_pandas`) and any model a folder or Hub id names; a file's content enters
its units' keys."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from ntps_nb import study
from ntps_nb.core.score import NextTokenTieWarning
from ntps_nb.datasets import from_pandas, read_dataset_file, subsample

#: Three classes of short texts, 14 each (made up here; no licence attached).
SUBJECTS = {"billing": ["my invoice", "the refund", "a double charge", "the monthly fee", "my receipt", "the tax line",
                        "a payment", "the discount", "my bank transfer", "the price", "a late fee", "the credit note",
                        "my subscription bill", "the VAT number"],
            "delivery": ["my parcel", "the courier", "the tracking code", "a lost package", "the delivery date",
                         "my address label", "the van", "a damaged box", "the pickup point", "the shipping time",
                         "my order status", "the customs form", "a missing item", "the return label"],
            "technical": ["the app", "my password", "the login page", "a crash", "the update", "the sync",
                          "my router", "the error code", "a slow screen", "the printer driver", "the battery",
                          "my account settings", "the camera", "a frozen tab"]}
TEMPLATES = ("Question about {}.", "Please help with {} today.")


def _frame(n_templates: int = 1) -> pd.DataFrame:
    rows = [(template.format(subject), label) for label, subjects in SUBJECTS.items() for subject in subjects
            for template in TEMPLATES[:n_templates]]
    return pd.DataFrame(rows, columns=["message", "team"])


def _study(tmp_path: Path, data: str, table: str = 'text = "message"\nlabel = "team"', **study) -> Path:
    settings = dict(name='"byod"', models='["tiny-llama"]', max_train=40, max_test=20, max_length=16, batch_size=16,
                    layers='"all"', probes='["heldout"]', peers="false", shards=4, interval_layers="[-1]", n_boot=10,
                    diagnostics="false", results_dir='"results"', **study)
    lines = ["[study]", *(f"{key} = {value}" for key, value in settings.items()),
             "", "[[datasets]]", 'name = "tickets"', f'path = "{data}"', table]
    path = tmp_path / "byod.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_unit_of_a_data_file_runs_end_to_end_and_its_edit_makes_it_stale(tmp_path):
    (tmp_path / "data").mkdir()
    csv = tmp_path / "data" / "tickets.csv"
    _frame().to_csv(csv, index=False)
    cfg = study.load_config(_study(tmp_path, "data/tickets.csv", datasets='["trec6"]'))
    assert cfg.datasets == ("trec6", "tickets")  # the [study] list, then the [[datasets]] tables
    assert cfg.dataset_file("tickets").path == str(csv.resolve()) and cfg.dataset_file("trec6") is None
    # the embedding layer's next states repeat with the tokens: tied next-token eigenvalues, named with the unit
    with pytest.warns(NextTokenTieWarning, match=r"^the ntps stage of tiny-llama x tickets, layer 0, the pooled "
                                                 r"moments: the next-token eigenvalues are tied at k = "):
        result = study.run_study(cfg, datasets=["tickets"], cache=tmp_path / "cache", log=lambda _: None)
    assert list(result["status"]) == ["done"]
    folder = cfg.unit_folder("tiny-llama", "tickets")
    probes, ntps = pd.read_csv(folder / "probes.csv"), pd.read_csv(folder / "ntps.csv")
    assert set(probes["dataset"]) == set(ntps["dataset"]) == {"tickets"}
    # the split: 42 texts, test share max_test / (max_train + max_test) = 1/3 per class, stratified
    assert (probes["n_train"].iloc[0], probes["n_test"].iloc[0], probes["n_classes"].iloc[0]) == (27, 15, 3)
    meta = json.loads((folder / "unit.json").read_text())
    assert meta["dataset_file"]["sha256"] == cfg.dataset_file("tickets").sha256
    assert study.unit_status(cfg, "tiny-llama", "tickets") == "complete"

    keys = study.stage_keys(cfg, "tiny-llama", "tickets")
    _frame(n_templates=2).to_csv(csv, index=False)  # the file is edited: twice the texts
    with pytest.raises(study.StudySettingsError, match="changed since"):
        study.run_unit(cfg, "tiny-llama", "tickets", log=lambda _: None)  # keys of the old content: refused
    edited = study.load_config(cfg.source)
    assert edited.dataset_file("tickets").sha256 != cfg.dataset_file("tickets").sha256
    new_keys = study.stage_keys(edited, "tiny-llama", "tickets")
    assert all(new_keys[name] != keys[name] for name in keys)  # every stage of the unit is stale
    assert study.stage_keys(edited, "tiny-llama", "trec6") == study.stage_keys(cfg, "tiny-llama", "trec6")
    assert study.unit_status(edited, "tiny-llama", "tickets") == "stale"
    assert edited.config_hash == cfg.config_hash  # the study-wide settings did not change
    states = study.stage_status(edited).set_index("dataset").loc["tickets"]
    assert states["ntps"] == "stale" and states["probes"] == "stale"


def test_a_split_column_is_the_split(tmp_path):
    frame = _frame()
    frame["part"] = ["test" if i % 4 == 0 else "train" for i in range(len(frame))]
    frame.to_csv(tmp_path / "t.csv", index=False)
    cfg = study.load_config(_study(tmp_path, "t.csv", 'text = "message"\nlabel = "team"\nsplit = "part"'))
    ds, info = study.config.load_unit_dataset(cfg, "tickets")
    assert sorted(ds["test"]["text"]) == sorted(frame.loc[frame["part"] == "test", "message"])
    assert info["source"]["dataframe"]["split"] == "part" and info["name"] == "tickets"
    assert info["split_rule"].startswith("the column 'part'")
    frame.loc[3, "part"] = "validation"
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(study.StudySettingsError, match=r"split column 'part' holds \[\"'validation'\"\]"):
        study.load_config(tmp_path / "byod.toml")


@pytest.mark.parametrize("bad, table", [
    ("one class", 'text = "message"\nlabel = "team"'),
    ("no label column", 'text = "message"\nlabel = "owner"'),
    ("an empty text", 'text = "message"\nlabel = "team"'),
    ("a missing label", 'text = "message"\nlabel = "team"'),
])
def test_a_bad_file_gives_from_pandas_error_naming_the_file(tmp_path, bad, table):
    frame = _frame()
    if bad == "one class":
        frame["team"] = "billing"
    elif bad == "an empty text":
        frame.loc[5, "message"] = ""
    elif bad == "a missing label":
        frame.loc[7, "team"] = None
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    columns = dict(text_col="message", label_col=re.search(r'label = "(\w+)"', table).group(1))
    with pytest.raises(ValueError) as expected:  # what from_pandas says of the same table
        from_pandas(pd.read_csv(path, keep_default_na=False, na_values={"team": [""]}), **columns)
    with pytest.raises(study.StudySettingsError) as raised:
        study.load_config(_study(tmp_path, "bad.csv", table))
    message = str(raised.value)
    assert str(expected.value) in message and str(path.resolve()) in message and "'tickets'" in message
    with pytest.raises(ValueError, match=re.escape(f"{path}: {expected.value}")):
        read_dataset_file(path, **columns)


def test_a_missing_file_and_bad_tables_are_refused(tmp_path):
    with pytest.raises(study.StudySettingsError, match="no data file at"):
        study.load_config(_study(tmp_path, "nowhere.csv"))
    _frame().to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(study.StudySettingsError, match=r"unknown key\(s\) \['labels'\]"):
        study.load_config(_study(tmp_path, "t.csv", 'text = "message"\nlabels = "team"'))
    path = _study(tmp_path, "t.csv")
    path.write_text(path.read_text().replace('name = "tickets"', 'name = "trec6"'))
    with pytest.raises(study.StudySettingsError, match="registry dataset's"):
        study.load_config(path)
    with pytest.raises(study.StudySettingsError, match="unknown dataset 'trec-6'"):
        study.load_config(_study(tmp_path, "t.csv", datasets='["trec-6"]'))
    with pytest.raises(study.StudySettingsError, match="more than once"):
        study.load_config(_study(tmp_path, "t.csv", datasets='[{name = "tickets", path = "t.csv"}]'))


def test_models_are_registry_names_folders_or_hub_ids(tmp_path):
    (tmp_path / "checkpoints" / "mine").mkdir(parents=True)
    given = '["tiny-llama", "smollm2-135m:random", "HuggingFaceTB/SmolLM2-360M", "checkpoints/mine", "checkpoints/mine:random"]'
    cfg = _with_models(tmp_path, given)
    folder = str((tmp_path / "checkpoints" / "mine").resolve())
    assert cfg.models == ("tiny-llama", "smollm2-135m:random", "HuggingFaceTB/SmolLM2-360M", folder, folder + ":random")
    for bad in ("smollm", "./checkpoints/theirs", "a/b/c"):
        with pytest.raises(study.StudySettingsError, match="neither a known name"):
            _with_models(tmp_path, f'["{bad}"]')


def _with_models(tmp_path: Path, models: str) -> study.StudyConfig:
    path = tmp_path / "models.toml"
    path.write_text(f'[study]\nname = "m"\nmodels = {models}\ndatasets = ["trec6"]\n')
    return study.load_config(path)


def test_the_notebook_recipes_take_a_file_and_count_its_cost(tmp_path, tiny_llama):
    from ntps_nb import notebooks as nbs

    path = tmp_path / "tickets.csv"
    _frame().to_csv(path, index=False)
    ds = read_dataset_file(path, "message", "team")
    cost = nbs.estimate_cost(tiny_llama, ds, max_train=20, max_test=None, max_length=5, batch_size=8, n_timed=4)
    sub = subsample(ds, max_train=20, max_test=None, seed=0)  # the texts the extraction will read
    lengths = [len(tiny_llama[1](text)["input_ids"]) for split in ("train", "test") for text in sub[split]["text"]]
    assert (cost["train texts"], cost["test texts"]) == (20, len(ds["test"]))
    assert cost["tokens"] == sum(min(n, 5) for n in lengths)
    assert cost["truncated texts"] == sum(n > 5 for n in lengths) > 0
    assert cost["forward passes (batches)"] == 3 + -(-len(ds["test"]) // 8)
    assert cost["timed texts"] == 4 and cost["estimated seconds"] > 0
    run = nbs.extract_model_on_dataset("tiny-llama", ds, loaded=tiny_llama, max_train=20, max_test=10, max_length=16)
    assert run.dataset == "tickets" and run.settings["max_train"] == 20 and run.n_classes == 3


def test_tsv_and_parquet_read_as_the_csv(tmp_path):
    frame = _frame()
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_csv(tmp_path / "t.tsv", index=False, sep="\t")
    formats = ["t.csv", "t.tsv"]
    try:
        frame.to_parquet(tmp_path / "t.parquet")
        formats.append("t.parquet")
    except ImportError:  # no parquet engine installed
        pass
    reads = {name: read_dataset_file(tmp_path / name, "message", "team") for name in formats}
    for name, ds in reads.items():
        for split in ("train", "test"):
            assert ds[split]["text"] == reads["t.csv"][split]["text"], name
            assert ds[split]["label"] == reads["t.csv"][split]["label"], name
    with pytest.raises(ValueError, match=r"unknown data file type '\.xlsx'"):
        (tmp_path / "t.xlsx").write_bytes(b"")
        read_dataset_file(tmp_path / "t.xlsx", "message", "team")
