"""Shared fixtures: offline Hugging Face settings and session-wide tiny and small models.

The Hub is never reachable here, so the offline switches are set before anything imports
huggingface_hub (it reads them once, at import). Model fixtures import ntps_nb.models lazily,
so the pure-math tests under tests/core never import torch or transformers.

The model fixtures are shared by the whole session: use them read-only. A test that changes a
model (LoRA, in-place edits) loads its own copy with ``ntps_nb.models.load_model``.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The suite runs beside other jobs on few cores: one analysis thread per process (the study's default
# is the process's share of its cores, `ntps_nb.core.threads.default_threads`), as OMP_NUM_THREADS=1 does
# for the libraries. Measured on a loaded 2-core machine: a smoke study 15 s with 2 threads, 4.5 s with 1.
os.environ.setdefault("NTPS_NB_ANALYSIS_PROCESSES", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                        else os.cpu_count() or 1))

import sys  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
from beartype.roar import BeartypeDecorHintPep585DeprecationWarning  # noqa: E402
from jaxtyping import config as jaxtyping_config  # noqa: E402
from jaxtyping import install_import_hook  # noqa: E402

from tests.core.shapes import CHECKED_MODULES, TYPECHECKER  # noqa: E402

# The core's shape checks (tests/core/shapes.py). The import hook decorates the modules imported after it, so it is
# installed here, before any test module can import the core: installed in tests/core/conftest.py, a test directory
# collected before tests/core that imported the core turned the checks off for the whole suite (session 66).
SHAPES_CHECKED = "ntps_nb.core" not in sys.modules
# beartype's advice to prefer collections.abc.Sequence over typing.Sequence concerns hints it
# is not asked to check here (array_hints_only drops them)
warnings.filterwarnings("ignore", category=BeartypeDecorHintPep585DeprecationWarning)
_HOOK = install_import_hook(CHECKED_MODULES, TYPECHECKER)
# The hook stays installed for the session, but the checks run only inside tests/core (its conftest's autouse
# fixture): I/O, study and notebook tests call the core unchecked, as users do.
jaxtyping_config.update("jaxtyping_disable", True)


def pytest_addoption(parser):
    parser.addoption("--torch-device", default=None,
                     help="the torch device the torch test files solve on (tests/core/torch_device.py; default cpu), "
                          "e.g. cuda: the same tests, each device= of theirs on that device, against numpy's results")


def pytest_configure(config):
    """``--torch-device`` for the torch test files: checked here (a clear error, not every torch test failing), then
    handed to them, and to the fresh interpreters some of them start, through NTPS_NB_TEST_DEVICE."""
    device = config.getoption("--torch-device")
    if device is None:
        return
    try:
        import torch

        torch.zeros(1, device=device)
    except Exception as error:  # no torch, an unknown device, no such device on this machine
        raise pytest.UsageError(f"--torch-device {device!r} cannot be used here: {type(error).__name__}: {error}")
    os.environ["NTPS_NB_TEST_DEVICE"] = device


def _load(name):
    from ntps_nb.models import load_model

    return load_model(name, seed=0)


@pytest.fixture
def core_bars(monkeypatch):
    """Every progress bar `ntps_nb.core.progress` makes during the test, each shown at once (delay 0): a list of
    tqdm bars, each with ``enabled`` (whether it was made to show; closing disables every bar) and ``given_desc``
    (the desc it was made with; a disabled bar keeps none of its own)."""
    from tqdm.std import tqdm

    import ntps_nb.core.progress as progress

    made = []

    class RecordingBar(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.enabled, self.given_desc = not self.disable, kwargs.get("desc")
            made.append(self)

    monkeypatch.setattr(progress, "tqdm", RecordingBar)
    monkeypatch.setattr(progress, "PROGRESS_DELAY_S", 0.0)
    return made


@pytest.fixture(scope="session")
def tiny_llama():
    """(model, tokenizer, info) of ``tiny-llama``: 2 layers, d=64, SmolLM2 tokenizer, seed 0."""
    return _load("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    """(model, tokenizer, info) of ``tiny-gpt2``: 2 layers, d=64, SmolLM2 tokenizer, seed 0."""
    return _load("tiny-gpt2")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer, info) of pretrained ``smollm2-135m`` (converts the GGUF on first use)."""
    return _load("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_random():
    """(model, tokenizer, info) of the ``smollm2-135m:random`` control, seed 0."""
    return _load("smollm2-135m:random")
