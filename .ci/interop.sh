#!/usr/bin/env bash
# The interop suite (issue 11): original and converted sample models through onnxruntime, OpenVINO,
# onnxslim, onnxsim, onnxruntime int8 quantization (dynamic, static QDQ, and --quantize int8's model.int8.onnx),
# pnnx + ncnn, onnx2tf + LiteRT and onnx2torch. Run from a fresh clone after the main venv exists (.ci/run's step 1), e.g.
#     bash .ci/interop.sh
# Creates the tools' own venvs under .venv-interop/ (ignored by git through its own .gitignore) when they
# are missing, then runs tests/interop with FYC_INTEROP=1. Set FYC_INTEROP_TORCH to the python of an
# existing venv with torch + torchvision + onnx2torch to skip building .venv-interop/torch (~4 min, 5 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)

if [ -z "${VIRTUAL_ENV:-}" ]; then
  . .venv/bin/activate
fi
# the tools that run in the main venv (pnnx without its dependencies: it names torch, which is installed already,
# and pip would replace the CPU wheel with a CUDA build)
pip install -q openvino==2026.4.1 onnxslim==0.1.98 onnxsim==0.8.1 ncnn==1.0.20261020
pip install -q --no-deps pnnx==20261020
mkdir -p .venv-interop out
[ -f .venv-interop/.gitignore ] || echo '*' > .venv-interop/.gitignore

make_venv() {  # make_venv NAME LOCKFILE: a venv from a pip freeze, rebuilt when the lock file changed
  local dir=".venv-interop/$1" lock=".ci/$2"
  if [ -x "$dir/bin/python" ] && cmp -s "$lock" "$dir/.lock"; then
    return
  fi
  rm -rf "$dir"
  python3 -m venv "$dir"
  # the machine's local package indexes make pip warn about every package they lack: not our news
  "$dir/bin/pip" install -q -r "$lock" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
  cp "$lock" "$dir/.lock"
  echo "interop: built $dir ($(( $(date +%s) - start )) s so far)"
}

make_venv tflite interop-tflite.txt
if [ -z "${FYC_INTEROP_TORCH:-}" ]; then
  make_venv torch interop-torch.txt
fi

FYC_INTEROP=1 FYC_INTEROP_REPORT=out/interop.json OMP_NUM_THREADS=1 \
  python -m pytest tests/interop -q -p no:cacheprovider -rsx "$@"
# The comparisons with torchvision that the main venv skips (it has no torchvision): our transforms against
# torchvision's, pixel for pixel, and the image-folder order against torchvision's ImageFolder.
torch_py=${FYC_INTEROP_TORCH:-.venv-interop/torch/bin/python}
"$torch_py" -m pytest --version >/dev/null 2>&1 || "$torch_py" -m pip install -q pytest
PYTHONPATH=. "$torch_py" -m pytest tests/test_transforms.py \
  tests/test_data.py::test_image_folder_matches_torchvision_imagefolder -q -p no:cacheprovider -rs
echo "interop: done in $(( $(date +%s) - start )) s"
