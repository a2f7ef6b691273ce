#!/usr/bin/env bash
# Installs the Django Channels baseline (and matplotlib for the plot) into a virtualenv
# under ~/.cache, from PyPI, with the versions pinned in requirements.txt.
# Usage: bench/baselines/django/install.sh [VENV_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-${HERALD_BENCH_VENV:-$HOME/.cache/herald-bench/django-venv}}"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ -x "$venv/bin/daphne" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "django baseline: $venv is up to date"
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
echo "$want" > "$stamp"
echo "django baseline: installed in $venv"
