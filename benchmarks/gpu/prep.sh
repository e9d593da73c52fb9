#!/usr/bin/env bash
# Prepares a GPU run of this project for a GPU machine that has PyTorch but no package registry
# (benchmarks/gpu/run.sh runs there). Run here, from anywhere, after ./setup.sh, on a machine with
# PyPI access. Fills the git-ignored .gpu/ at the project's root:
#   .gpu/requirements.txt  the pinned packages of .venv that the GPU image lacks
#   .gpu/whl/              their wheels (CPython $GPU_PYTHON, manylinux x86_64)
#   .gpu/data/             Fashion-MNIST: the test set and a 30,000-image cut of the training set, xz
# Then run there, with .gpu/ beside the project:  bash benchmarks/gpu/run.sh
# Safe to run again: wheels already in .gpu/whl are kept.
set -euo pipefail
cd "$(dirname "$0")/../.."
GPU_PYTHON=${GPU_PYTHON:-3.12}   # the GPU image's Python
[ -x .venv/bin/python ] || { echo "prep.sh: no .venv here; run ./setup.sh first" >&2; exit 1; }
mkdir -p .gpu/whl .gpu/data
rm -rf .gpu/site  # what run.sh installed on a GPU machine; never carried from here
git check-ignore -q .gpu || { echo "prep.sh: .gpu/ is not git-ignored; add /.gpu/ to .gitignore" >&2; exit 1; }

# Python packages the GPU image already has (its package list of 2026-11-17): the rest travels.
have=$(echo "absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp" | tr -s ' \n' '\n\n')
# Not needed there: CUDA libraries come with the image's torch; no linting, dashboard or PostgreSQL.
.venv/bin/python -m pip freeze --exclude-editable 2>/dev/null | grep '==' | while IFS= read -r line; do
  name=${line%%==*}; low=$(echo "$name" | tr 'A-Z_.' 'a-z--')
  echo "$have" | grep -qx "$low" && continue
  case "$low" in nvidia-*|ruff|optuna-dashboard|bottle|psycopg2-binary) continue;; esac
  echo "$line"
done > .gpu/requirements.txt

plat=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux1_x86_64; do plat+=(--platform "$p"); done
while IFS= read -r req; do
  name=${req%%==*}; version=${req##*==}
  ls .gpu/whl | grep -qi "^$(echo "$name" | tr '.-' '__')-${version}-" && continue  # wheel names use _
  # A package published only as a source archive (antlr4-python3-runtime 4.9.3) is built here.
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version "$GPU_PYTHON" --implementation cp "${plat[@]}" -d .gpu/whl "$req" 2>/dev/null \
    || .venv/bin/python -m pip wheel -q --disable-pip-version-check --no-deps -w .gpu/whl "$req"
done < .gpu/requirements.txt

src=$(dirname "$(dpkg -L dataset-fashion-mnist | grep train-images-idx3-ubyte.gz)")
python3 - "$src" .gpu/data <<'PY'
import gzip, lzma, os, struct, sys
src, dst = sys.argv[1:]
def cut(name, n, header):
    if os.path.exists(f"{dst}/{name}.xz"):
        return
    data = gzip.open(f"{src}/{name}.gz").read()
    fields = list(struct.unpack(header, data[:struct.calcsize(header)]))
    per = 1
    for d in fields[2:]:
        per *= d
    fields[1] = count = min(n, fields[1])
    body = data[struct.calcsize(header):struct.calcsize(header) + count * per]
    with lzma.open(f"{dst}/{name}.xz.tmp", "wb", preset=6) as f:
        f.write(struct.pack(header, *fields) + body)
    os.replace(f"{dst}/{name}.xz.tmp", f"{dst}/{name}.xz")
# 30,000 training images hold ~3,000 per class: the source task (2,200 per class of 0-4) and
# the GPU benchmark's target (1,200 per class of 5-9) both fit.
cut("train-images-idx3-ubyte", 30000, ">IIII"); cut("train-labels-idx1-ubyte", 30000, ">II")
cut("t10k-images-idx3-ubyte", 10000, ">IIII"); cut("t10k-labels-idx1-ubyte", 10000, ">II")
PY
du -sh .gpu/whl .gpu/data
echo "ready: on the GPU machine, from the project's root with .gpu/ beside it: bash benchmarks/gpu/run.sh"
