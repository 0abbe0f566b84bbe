#!/usr/bin/env bash
# A non-editable install works on its own: `pip install .` into a fresh venv, then, from a folder outside the
# source tree (so nothing is imported from the checkout), `fyc-convert --version`, `--help` and the digits
# conversion end to end. Catches a subpackage or data file that pyproject.toml does not ship.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
# the machine's local package indexes make pip warn about every package they lack: not our news
"$work/venv/bin/pip" install -q torch==2.13.0 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
"$work/venv/bin/pip" install -q "$repo" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
cd "$work"
"$work/venv/bin/python" - <<'PY'
import fyc_convert, sys
assert "site-packages" in fyc_convert.__file__, fyc_convert.__file__  # the installed copy, not the checkout
print("installed:", fyc_convert.__file__)
PY
"$work/venv/bin/fyc-convert" --version
COLUMNS=80 "$work/venv/bin/fyc-convert" --help > /dev/null
"$work/venv/bin/fyc-convert" "$repo/sample_models/digits_cnn.pt" --arch "$repo/sample_models/archs.py:digits_cnn" \
  --data "$repo/sample_models/digits.npz" --epochs 1 -o "$work/digits_fyc" -q
test -s "$work/digits_fyc/model.onnx" && test -s "$work/digits_fyc/report.json"
echo "install check: ok"
