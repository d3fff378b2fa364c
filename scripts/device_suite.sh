#!/usr/bin/env bash
# The GPU benchmarks in one call (a device machine is lent to some sessions only, for minutes): every section has
# its own time limit and writes its log as it goes, so a slow or failing section costs only itself.
#
#   OUT=results/device bash scripts/device_suite.sh          # on a machine with a GPU and jax[cuda]
#
# Sections, in order of priority:
#   adaptive128k  scripts/bench_adaptive.py on the 128,256 x 4096 LLM-like head, f32 and bf16, batch 1 and 64
#   decode        scripts/bench_topk_decode.py, one query, n = 2,048 ... 32,768 (issue 15 part 3)
#   adaptive32k   scripts/bench_adaptive.py on the 32,000 x 4096 head, f32
#   decode_q32    the same with 32 queries per call (a GPU needs more than one 64-d query to fill)
#   rff           scripts/bench_rff.py at n = 1e5 and 1e6 with the D = 256 / 1024 trees that a CPU run skips
# Each section writes its log and a benchmark snapshot ($OUT/bench_<section>/results.json and table.md, through
# experiments/benchlib.py: device, jax version, load, command); commit a snapshot directory under docs/results/
# (e.g. docs/results/bench_decode_h200) and show its tables with include blocks, never retyped.
set -u
OUT=${OUT:-results/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
S=${SCALE:-1}  # multiplies every time limit

section() {  # name, seconds, command...
  local name=$1 secs=$2
  shift 2
  echo "== $name (limit $((secs * S)) s): $*" | tee -a "$OUT/suite.log"
  local t0=$SECONDS
  timeout $((secs * S)) "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc after $((SECONDS - t0)) s" | tee -a "$OUT/suite.log"
  tail -n 3 "$OUT/$name.log" | sed 's/^/   /' >>"$OUT/suite.log"
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  $PY -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1
} >"$OUT/suite.log"

section adaptive128k 200 $PY scripts/bench_adaptive.py --heads llm128k --dtypes float32 bfloat16 \
  --variants paper certified --batch 1 64 --workdir "$OUT/bench_adaptive128k"
section decode 100 $PY scripts/bench_topk_decode.py --repeats 7 --workdir "$OUT/bench_decode"
section adaptive32k 80 $PY scripts/bench_adaptive.py --heads llm32k --dtypes float32 --variants paper certified \
  --batch 1 64 --workdir "$OUT/bench_adaptive32k"
section decode_q32 40 $PY scripts/bench_topk_decode.py --repeats 7 --queries 32 --ns 4096,32768 \
  --workdir "$OUT/bench_decode_q32"
section rff 80 $PY scripts/bench_rff.py --ns 100000,1000000 --max_tree_gb 40 --workdir "$OUT/bench_rff"
echo "suite done after $SECONDS s" | tee -a "$OUT/suite.log"
