"""The paper's torch probe (SPEC section 7): a dropout + linear head trained on pooled features.

It sits beside the model I/O rather than in the core because it needs torch; its inputs are
checked as the core's probes check theirs, and its row has the columns of
`ntps_nb.core.probes.heldout_probe` (``protocol="torch_linear"``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float

from ntps_nb.core.probes import _check_inputs, chance_corrected_accuracy
from ntps_nb.core.validation import check_count

__all__ = ["torch_linear_probe"]


def torch_linear_probe(
    train_X: Float[np.ndarray, "N d"],
    train_y: Sequence[int],
    test_X: Float[np.ndarray, "M d"],
    test_y: Sequence[int],
    *,
    n_classes: int,
    epochs: int = 50,
    lr: float = 1e-4,
    batch_size: int = 64,
    dropout: float = 0.05,
    weight_decay: float = 0.01,
    seed: int = 0,
    device: str = "cpu",
    return_predictions: bool = False,
) -> dict[str, Any] | tuple[dict[str, Any], np.ndarray]:
    """The paper's torch probe (SPEC section 7): dropout + linear head on mean-pooled features,
    cross-entropy, AdamW, shuffled mini-batches; test accuracy after the last epoch.

    Features are used as given (no standardisation, as in the paper). The global torch RNG is
    left untouched: initialisation, dropout and shuffling draw from a forked, seeded state.
    ``weight_decay`` 0.01 is AdamW's default.

    Parameters
    ----------
    train_X, test_X : ndarray, shape (N, d) and (M, d)
        Pooled features of the train and test splits.
    train_y, test_y : sequence of int, shape (N,) and (M,)
        Integer labels in ``0..n_classes-1``; train must hold at least 2 classes.
    n_classes : int
        C, the number of classes (head width, chance, kappa).
    epochs, batch_size : int
        Passes over the train split and texts per optimiser step (positive integers).
    lr, weight_decay : float
        AdamW's learning rate (> 0) and weight decay.
    dropout : float
        Dropout before the linear layer, in [0, 1).
    seed : int
        Seeds initialisation, dropout and shuffling.
    device : str
        Where the head is trained.
    return_predictions : bool
        Also return the predicted class of every test text, in input order.

    Returns
    -------
    dict, or (dict, ndarray)
        A tidy row like `heldout_probe`'s with ``protocol="torch_linear"``, ``final_train_loss``,
        ``epochs``, ``lr``, ``batch_size``, ``dropout``, and NaN for the least-squares columns;
        with ``return_predictions``, also the (M,) int64 predicted classes.
    """
    Xtr, ytr, Xte, yte = _check_inputs(train_X, train_y, test_X, test_y, n_classes, need_test=True)
    n_classes = int(n_classes)
    epochs, batch_size = check_count(epochs, "epochs"), check_count(batch_size, "batch_size")
    if not (lr > 0 and 0 <= dropout < 1):
        raise ValueError(f"need lr > 0 and 0 <= dropout < 1; got lr={lr}, dropout={dropout}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        head = torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(Xtr.shape[1], n_classes)).to(device)
        optimiser = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        loss_fn = torch.nn.CrossEntropyLoss()
        X = torch.as_tensor(Xtr, dtype=torch.float32, device=device)
        y = torch.as_tensor(ytr, dtype=torch.long, device=device)
        head.train()
        for _ in range(epochs):
            total, order = 0.0, torch.randperm(X.shape[0], generator=generator).to(device)
            for start in range(0, X.shape[0], batch_size):
                batch = order[start:start + batch_size]
                optimiser.zero_grad()
                loss = loss_fn(head(X[batch]), y[batch])
                loss.backward()
                optimiser.step()
                total += loss.item() * batch.numel()
        head.eval()
        with torch.no_grad():
            logits = head(torch.as_tensor(Xte, dtype=torch.float32, device=device))
            predicted = logits.argmax(dim=1).cpu().numpy()
    accuracy = float(np.mean(predicted == yte))
    counts = np.bincount(ytr, minlength=n_classes)
    row = {
        "protocol": "torch_linear", "evaluated_on": "test", "n_classes": n_classes,
        "classes_in_train": int(np.count_nonzero(counts)), "n_train": int(Xtr.shape[0]), "n_eval": int(Xte.shape[0]),
        "d": int(Xtr.shape[1]), "accuracy": accuracy, "kappa": chance_corrected_accuracy(accuracy, n_classes),
        "chance": 1.0 / n_classes, "majority_rate": float(np.mean(yte == int(np.argmax(counts)))),
        "mse": float("nan"), "mse_per_text": float("nan"), "lstsq_accuracy": float("nan"),
        "final_train_loss": total / X.shape[0], "epochs": int(epochs), "lr": float(lr), "batch_size": int(batch_size),
        "dropout": float(dropout), "weight_decay": float(weight_decay), "seed": int(seed),
    }
    return (row, np.asarray(predicted, dtype=np.int64)) if return_predictions else row
