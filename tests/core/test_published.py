"""The packaged published values and the per-model correlations they reproduce."""

import numpy as np
import pytest
import scipy.stats

import tomllib
from fnmatch import fnmatch
from pathlib import Path

from ntps_nb.core.published import REFERENCE_DIR, load_published, published_correlations

ROOT = Path(__file__).resolve().parents[2]

MODELS = ["Qwen/Qwen2-0.5B", "Qwen/Qwen2-1.5B", "Qwen/Qwen2-7B", "apple/OpenELM-1_1B", "apple/OpenELM-270M",
          "apple/OpenELM-3B", "apple/OpenELM-450M", "meta-llama/Meta-Llama-3-8B"]

# Per-model Spearman across the 12 datasets, as this package computes them from the released
# figure data (the paper's figure annotations were not available to check against).
PUBLISHED_SPEARMAN = {
    # rho(ntps, train_accuracy): positive
    "fig2_accuracy": [0.69, 0.64, 0.82, 0.73, 0.57, 0.66, 0.52, 0.72],
    # rho(ntps, train_mse): negative
    "fig2_mse": [-0.70, -0.68, -0.68, -0.43, -0.42, -0.73, -0.46, -0.52],
    # rho(ntps, -(lora - linear probe accuracy)): positive, i.e. lower NTPS, larger LoRA gain
    "fig3_lora": [0.77, 0.67, 0.59, 0.90, 0.87, 0.52, 0.87, 0.40],
}


def test_reference_files_and_licence_ship_with_the_package():
    for name in ("paper_fig2_accuracy.csv", "paper_fig2_mse.csv", "paper_fig3_lora.csv",
                 "paper_fig1_projections.csv", "README.md", "LICENSE"):
        assert (REFERENCE_DIR / name).is_file()
    licence = (REFERENCE_DIR / "LICENSE").read_text()
    assert "MIT" in licence and "Copyright (c) 2025 Yu-Ang Cheng" in licence
    assert "0f877f7" in (REFERENCE_DIR / "README.md").read_text()


def test_reference_files_are_declared_package_data_and_read_as_resources():
    # setuptools installs exactly what package-data names: every reference file must match a pattern
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["ntps_nb"]
    folder = ROOT / "ntps_nb" / "data" / "reference"
    files = sorted(p.relative_to(ROOT / "ntps_nb").as_posix() for p in folder.iterdir())
    assert len(files) == 6
    assert [f for f in files if not any(fnmatch(f, pattern) for pattern in patterns)] == []
    assert Path(str(REFERENCE_DIR)).resolve() == folder.resolve()  # the resource is the package's own folder
    assert published_correlations().source.str.startswith("ntps_nb/data/reference/").all()


@pytest.mark.parametrize("figure", ["fig2_accuracy", "fig2_mse", "fig3_lora"])
def test_each_figure_has_8_models_by_12_datasets(figure):
    frame = load_published(figure)
    assert sorted(frame.model.unique()) == MODELS
    assert (frame.groupby("model").dataset.nunique() == 12).all()
    assert len(frame) == 96 and frame.ntps.between(0, 1).all()


def test_lora_gain_sign_convention():
    frame = load_published("paper_fig3_lora")
    np.testing.assert_allclose(frame.lora_gain, frame.lora_test_accuracy - frame.linear_probe_test_accuracy)
    np.testing.assert_allclose(frame.minus_lora_gain, -frame.lora_gain)
    with pytest.raises(ValueError, match="unknown figure"):
        load_published("fig4")


def test_published_per_model_spearman():
    table = published_correlations()
    assert len(table) == 24
    for figure, expected in PUBLISHED_SPEARMAN.items():
        rows = table[table.figure == figure].set_index("model").loc[MODELS]
        np.testing.assert_allclose(rows.rho.round(2), expected, atol=1e-9)
        assert (np.sign(rows.rho) == rows.expected_sign).all()  # every model has the paper's sign
    # independent check of one figure with scipy
    lora = load_published("fig3_lora")
    for model, group in lora.groupby("model"):
        rho = scipy.stats.spearmanr(group.ntps, -(group.lora_test_accuracy - group.linear_probe_test_accuracy))[0]
        assert table.query("figure == 'fig3_lora' and model == @model").rho.item() == pytest.approx(rho, abs=1e-12)
