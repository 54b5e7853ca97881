"""Register the ``notebooks`` marker (papermill smoke runs and nbval; minutes, not seconds)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "notebooks: executes notebooks (papermill smoke runs, nbval); a few minutes")
