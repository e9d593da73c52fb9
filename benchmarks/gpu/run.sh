#!/usr/bin/env bash
# Runs ON a GPU machine, from anywhere in the project, with .gpu/ filled by benchmarks/gpu/prep.sh:
#   bash benchmarks/gpu/run.sh [study] [tests] [bench] [readme]      (default: all four, in order)
# Installs the carried wheels beside the image's PyTorch (unless they are importable already),
# lays out Fashion-MNIST under outputs/data, then runs each step with its own time limit,
# within a budget for the whole run ($BUDGET s, default 480, setup included). On an H200 all
# four take more than one 10-minute call: `study tests` (about 300 s), `bench`, then `readme`.
#   study   the default study, then its model exported: python -m sweeper.run -m; python -m sweeper.export
#   tests   the tests marked gpu:           python -m pytest -m gpu  (GPU_TESTS=EXPR: only -k EXPR)
#   bench   the GPU benchmark:              python -m benchmarks.gpu_speed  (BENCH_ARGS=...: its options,
#           e.g. --no-table for the study alone; WRAP=...: a command it runs under, e.g. a profiler)
#   readme  README commands: a ResNet-50 trial, the report, a rerun, a basic sweep, the CPU benchmark
# Each step's log is $OUT/<step>.log (default OUT=.gpu/out); $OUT/summary.txt has one line per step
# (appended to: several runs in one call share it).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-.gpu/out}; BUDGET=${BUDGET:-480}; PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg HYDRA_FULL_ERROR=1
S=$(date +%s); deadline=$(( S + BUDGET ))
steps=${*:-study tests bench readme}

needs="import hydra, optuna, mlflow, hydra_plugins.hydra_joblib_launcher"  # what the image lacks
if ! "$PY" -c "$needs" 2>/dev/null; then
  [ -d .gpu/whl ] || { echo "run.sh: no .gpu/whl: run benchmarks/gpu/prep.sh first, where PyPI is reachable" >&2; exit 1; }
  site=$PWD/.gpu/site  # installed once per machine: a second run.sh in the same call reuses it
  PYTHONPATH=$site "$PY" -c "$needs" 2>/dev/null \
    || "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
         --disable-pip-version-check --target "$site" .gpu/whl/*.whl 2>&1 | grep -v WARNING | tail -3
  export PYTHONPATH=$PWD:$site
else
  export PYTHONPATH=$PWD
fi
raw=outputs/data/FashionMNIST/raw; mkdir -p "$raw"
for f in .gpu/data/*.xz; do
  [ -e "$f" ] || break
  b=$(basename "$f" .xz); [ -s "$raw/$b" ] || xz -dc "$f" > "$raw/$b"
done
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" -c "import torch, torchvision, hydra, optuna, mlflow; print('torch', torch.__version__, 'CUDA',
torch.version.cuda, 'available', torch.cuda.is_available(), '| torchvision', torchvision.__version__,
'| optuna', optuna.__version__, '| mlflow', mlflow.__version__)"; nproc; free -g | head -2; df -h . | tail -1
} 2>&1 | tee "$OUT/env.txt"
echo "== setup $(( $(date +%s) - S )) s" | tee -a "$OUT/summary.txt"

# step NAME LIMIT COMMAND...: COMMAND with at most LIMIT seconds, fewer when the budget runs out.
step() {
  local name=$1 limit=$2 left rc s; shift 2
  left=$(( deadline - $(date +%s) ))
  (( left < limit )) && limit=$left
  if (( limit < 15 )); then
    echo "== $name skipped: the ${BUDGET} s budget is spent (rerun: bash benchmarks/gpu/run.sh <step>)" \
      | tee -a "$OUT/summary.txt"
    return 0
  fi
  s=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1; rc=$?
  echo "== $name rc=$rc $(( $(date +%s) - s )) s (limit $limit s)$( ((rc == 124)) && echo ', TIMED OUT')" \
    | tee -a "$OUT/summary.txt"
  tail -n 12 "$OUT/$name.log" | cut -c1-240
}

last_trial() {  # the MLflow run id of the latest finished trial in outputs/
  "$PY" - <<'PY'
from mlflow.tracking import MlflowClient
client = MlflowClient("sqlite:///outputs/mlflow.db")
exp = client.get_experiment_by_name("sweeper")
runs = [] if exp is None else client.search_runs(
    [exp.experiment_id], "tags.`sweeper.kind` = 'trial' and attributes.status = 'FINISHED'",
    order_by=["attributes.start_time DESC"], max_results=1)
print(runs[0].info.run_id if runs else "no-finished-trial-in-outputs")
PY
}

for s in $steps; do
  case $s in
    study)  step study 120 "$PY" -m sweeper.run -m
            step export 60 "$PY" -m sweeper.export ;;
    tests)  step tests 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider --durations=12 \
                 ${GPU_TESTS:+-k "$GPU_TESTS"} ;;
    bench)  step bench 480 ${WRAP:-} "$PY" -m benchmarks.gpu_speed ${BENCH_ARGS:-} ;;
    readme)
      step trial_resnet50 60 "$PY" -m sweeper.run backbone=resnet50 freeze.unfrozen=3 optim.lr_head=0.01
      step report 30 "$PY" -m sweeper.report
      step rerun 40 "$PY" -m sweeper.rerun "$(last_trial)" trainer.device=cuda
      step basic_sweep 60 "$PY" -m sweeper.run -m hydra/sweeper=basic freeze.unfrozen=0,1,2,4
      step freeze_speed 120 "$PY" -m benchmarks.freeze_speed --seeds 1 --study none ;;
    *) echo "run.sh: unknown step $s (study, tests, bench, readme)" >&2; exit 1 ;;
  esac
done
echo "== total $(( $(date +%s) - S )) s" | tee -a "$OUT/summary.txt"
