#!/usr/bin/env bash
# Makes (once) the tools venv that scripts/wheel.sh and scripts/test-wheel.sh use, under target/
# (never committed), installs the PyPI packages named as arguments into it, and prints its path.
# Usage: scripts/wheel-tools.sh maturin [ziglang] [auditwheel]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$PWD/target/wheel-tools
declare -A spec=([maturin]="maturin>=1.5,<2" [ziglang]="ziglang>=0.13" [auditwheel]="auditwheel>=6")
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p target
  python3 -m venv "$venv" >&2
fi
missing=()
for p in "$@"; do
  "$venv/bin/python" -m pip show -q "$p" >/dev/null 2>&1 || missing+=("${spec[$p]:-$p}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]} into $venv" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${missing[@]}" >&2
fi
echo "$venv"
