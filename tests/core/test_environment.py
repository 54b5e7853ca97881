"""environment.yml installs the same pins as pyproject.toml (and the Makefile's torch)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def pip_section(text: str) -> set[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    pins = set()
    for line in lines[start + 1:]:
        item = line.strip()
        if not item.startswith("- "):
            if item and not item.startswith("#"):
                break
            continue
        item = item[2:].strip()
        if "==" in item:
            pins.add(item)
    return pins


def test_environment_yml_matches_pyproject_and_makefile():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted |= {req for req in extra if not req.startswith("ntps_nb")}
    torch_pin = re.search(r"^TORCH\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    wanted.add(torch_pin)
    assert all("==" in req for req in wanted), "every requirement is pinned exactly"
    assert pip_section((ROOT / "environment.yml").read_text()) == wanted
