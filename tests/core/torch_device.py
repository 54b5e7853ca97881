"""The torch device the torch test files solve on: "cpu" unless pytest runs with ``--torch-device`` (tests/conftest.py),
e.g. ``pytest --torch-device cuda tests/core/test_backend_torch.py`` on a machine with a GPU: the same tests, each
``device=`` of theirs on that device, against numpy's results on the host."""

import os

#: The device of the torch test files (the environment variable is set by ``--torch-device``).
DEVICE = os.environ.get("NTPS_NB_TEST_DEVICE", "cpu")
