"""The paper's torch probe: it learns, is seeded, leaves the global RNG alone, checks its inputs."""

import numpy as np
import pytest
import torch

from ntps_nb.torch_probe import torch_linear_probe


def blobs(rng, n=200, d=8, n_classes=3, spread=3.0):
    centres = rng.standard_normal((n_classes, d)) * spread
    y = rng.integers(0, n_classes, n)
    y[:n_classes] = np.arange(n_classes)
    return centres[y] + rng.standard_normal((n, d)), y


def test_torch_linear_probe_learns_is_seeded_and_leaves_global_rng_alone():
    X, y = blobs(np.random.default_rng(12345))
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    kwargs = dict(n_classes=3, epochs=5, lr=1e-2, batch_size=32, seed=7)
    row = torch_linear_probe(X[:150], y[:150], X[150:], y[150:], **kwargs)
    assert torch.rand(1) == before  # the global RNG stream is unchanged
    assert row["protocol"] == "torch_linear" and row["accuracy"] > 0.8
    again = torch_linear_probe(X[:150], y[:150], X[150:], y[150:], **kwargs)
    assert again["final_train_loss"] == row["final_train_loss"]
    with pytest.raises(ValueError, match="single class"):
        torch_linear_probe(X, np.ones(200, dtype=int), X, y, n_classes=3)
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 0"):
        torch_linear_probe(X, y, X, y, n_classes=3, epochs=0)


def test_the_old_core_path_still_finds_the_torch_probe():
    with pytest.warns(DeprecationWarning, match="moved to ntps_nb.torch_probe"):
        from ntps_nb.core.probes import torch_linear_probe as old
    assert old is torch_linear_probe
