#!/usr/bin/env bash
# The GPU checks, prepared to run in one go on a lent GPU machine (one H100/H200, at most ~5 min):
#   1. the GPU-only tests: every test module with tests marked `gpu` (fused kernels vs their
#      references, FlexAttention, collectives and the engine's inner step where present)
#   2. benchmarks/pretrain_throughput.py --device cuda   (ours vs LlamaForCausalLM, one training step)
#   3. benchmarks/generation.py --device cuda            (ours vs transformers' generate)
# Every figure is printed on its own line as `FIGURE <name> <value>`; everything that cannot run
# is skipped with a line saying why, and the script goes on.
#
# The lent machine has Python 3.12, torch, triton, transformers, sentencepiece and pyarrow, but no
# Ray, DeepSpeed, MLflow or network. Small wheels can travel with the working tree in .whl/
# (git-ignored: pass carry [".whl"] to the device tool); they are installed from there, offline.
# Prepare them on a machine with network access:
#   bash scripts/gpu_check.sh --prepare-wheels      # pytest, pydantic, liger-kernel, DeepSpeed (~10 MB)
# Without DeepSpeed the training benchmark runs its plain-PyTorch step; without liger-kernel the
# Liger tests skip; without pytest or pydantic the tests are skipped (said below).
#
#   bash scripts/gpu_check.sh            # on the GPU machine, from anywhere
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_SECONDS:-300}  # the whole script; each stage gets at most what is left
START=$(date +%s)
say() { echo "[gpu_check] $*"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

if [ "${1:-}" = "--prepare-wheels" ]; then
  # Python 3.12 / manylinux wheels for the GPU machine; DeepSpeed ships only an sdist, built here
  # as a pure-Python wheel (its CUDA ops are JIT-compiled on use, none is needed by the checks).
  mkdir -p .whl
  $PY -m pip download --quiet --dest .whl --only-binary=:all: --python-version 3.12 \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --no-deps \
      pytest==9.0.3 pluggy iniconfig pygments pytest-timeout==2.4.0 \
      pydantic==2.13.4 pydantic-core==2.46.4 annotated-types typing-inspection \
      liger-kernel==0.8.5 hjson py-cpuinfo ninja msgpack einops psutil==7.2.2 || exit 1
  DS_BUILD_OPS=0 $PY -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir .whl deepspeed==0.19.8 || exit 1
  du -sh .whl && ls .whl
  exit 0
fi

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  say "no CUDA device visible to torch: nothing to check here"
  exit 1
fi
$PY -c "import torch; print('[gpu_check] torch', torch.__version__, '|', torch.cuda.get_device_name(0))"

# ---------------------------------------------------------------- carried wheels (offline)
if compgen -G ".whl/*.whl" > /dev/null; then
  say "installing the wheels carried in .whl/ (offline)"
  for w in .whl/*.whl; do  # one by one: a wheel that does not fit this Python does not block the rest
    $PY -m pip install --quiet --no-index --find-links .whl --disable-pip-version-check "$w" 2>&1 \
      | tail -1 | sed "s|^|[gpu_check]   $(basename "$w"): |"
  done
else
  say "no .whl/ wheels carried (bash scripts/gpu_check.sh --prepare-wheels makes them)"
fi
# installed or not, without importing (importing DeepSpeed or transformers takes seconds)
has() { $PY -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('$1') else 1)" 2>/dev/null; }
for m in pytest pydantic liger_kernel deepspeed transformers triton; do
  if has "$m"; then say "available: $m"; else say "missing:   $m"; fi
done

# ---------------------------------------------------------------- 1. GPU-only tests
stage() {  # stage <name> <max seconds> <command...>: run with what is left of the budget
  local name=$1 cap=$2
  shift 2
  local t
  t=$(left)
  [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 20 ]; then
    say "SKIP $name: under 20 s of the ${BUDGET} s budget left"
    return 0
  fi
  say "RUN $name (at most ${t} s)"
  local s0 rc
  s0=$(date +%s)
  timeout --kill-after=10 "$t" "$@"
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then say "TIMEOUT $name after ${t} s"; else say "END $name rc=$rc"; fi
  echo "FIGURE gpu_check.$name.seconds $(($(date +%s) - s0))"
  echo "FIGURE gpu_check.$name.rc $rc"
}

GPU_TESTS=$(grep -l "mark.gpu" tests/test_*.py 2>/dev/null | tr '\n' ' ')
if ! has pytest; then
  say "SKIP tests: pytest is not installed (carry it in .whl/)"
elif ! has pydantic; then
  say "SKIP tests: pydantic is not installed (model/config.py needs it; carry it in .whl/)"
elif [ -z "$GPU_TESTS" ]; then
  say "SKIP tests: no test module marks tests gpu"
else
  # -o addopts= drops pyproject's options (pytest-timeout may be absent); collection errors of one
  # module (a package missing here) must not stop the others
  stage tests 90 env PYTHONPATH=. DS_BUILD_OPS=0 $PY -m pytest -m gpu -q -rs -p no:cacheprovider -o addopts= \
    --continue-on-collection-errors $GPU_TESTS
fi

# ---------------------------------------------------------------- 2-3. benchmarks
if ! has pydantic; then
  say "SKIP benchmarks: pydantic is not installed (model/config.py needs it; carry it in .whl/)"
else
  stage pretrain_benchmark 90 $PY benchmarks/pretrain_throughput.py --device cuda
  stage generation_benchmark 110 $PY benchmarks/generation.py --device cuda
fi
say "done in $(($(date +%s) - START)) s"
