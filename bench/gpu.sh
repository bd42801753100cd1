#!/usr/bin/env bash
# The GPU measurement of issue 16 as one script, for a lent device machine (15 minutes a session, all
# tries together). That machine has torch, transformers, triton and safetensors but not pydantic, and
# nothing can be fetched there, so first, here:
#
#     make gpu-wheels                                  # pydantic and its needs, as cp312 wheels, into .whl/
#
# then, through the device tool, from the repository root:
#
#     run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=590)
#
# Each step has its own time limit, so that one that hangs leaves the others their time; the logs land in
# $OUT (they come back) and in bench/.cache/gpu-logs otherwise. First the kernel cases compiled on the GPU
# (kernel_tests.log, ~1 min), then the 8B rows, the issue's targets (batch 1 <= 1.08x dense, a batch of 8
# over 3 branches <= 1.15x, prefill <= 1.08x; in_memory.log ends with a met/missed table), then the
# SmolLM2 and 1B bundles (bundles.log), then the sampler's logit adjustments (sampler.log).
# Rehearse it on the CPU with DEVICE=cpu SHAPES=tiny IN_MEMORY=tiny LAYOUTS=split,fused bash bench/gpu.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
SHAPES=${SHAPES-smollm2,1b}  # set but empty: skipped
IN_MEMORY=${IN_MEMORY-8b}
LAYOUTS=${LAYOUTS:-split,fused,triton}
REPEAT=${REPEAT:-4}
LOGS=${OUT:-bench/.cache/gpu-logs}
mkdir -p "$LOGS" && LOGS=$(cd "$LOGS" && pwd)
PY=${PY:-python3}
if ! $PY -c "import pydantic" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/bm-site .whl/*.whl \
    || { echo "gpu.sh: installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/bm-site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, transformers, triton, pydantic; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'pydantic', pydantic.__version__)"
} 2>&1 | tee "$LOGS/env.log" || exit 1
status=0
# the kernel cases compiled on the device first (the interpreter cannot catch a compile error), in one tile
# config each (autotuning would compile ~6 per case); on the CPU (a rehearsal) in the interpreter
interp=0; [ "$DEVICE" = cuda ] || interp=1
TRITON_INTERPRET=$interp BRANCHMERGE_KERNEL_DEVICE=$DEVICE BRANCHMERGE_AUTOTUNE=0 timeout "${KERNEL_TESTS_LIMIT:-90}" $PY -m pytest -q \
  -p no:cacheprovider tests/test_kernels.py -k "decode_and_prefill or uneven or shrink_split or bfloat16 or sibling_layers" \
  2>&1 | tee "$LOGS/kernel_tests.log" || status=1
cd bench
if [ -n "$IN_MEMORY" ]; then
  # in-memory layouts: fused (the torch path's best), triton (q/k/v and gate/up grouped), triton-solo (not)
  timeout "${IN_MEMORY_LIMIT:-270}" $PY runtime_gpu.py --device "$DEVICE" --shapes "" --in-memory "$IN_MEMORY" \
    --layouts "${IN_MEMORY_LAYOUTS:-fused,triton,triton-solo}" --repeat "$REPEAT" 2>&1 | tee "$LOGS/in_memory.log" || status=1
fi
if [ -n "$SHAPES" ]; then
  timeout "${SHAPES_LIMIT:-200}" $PY runtime_gpu.py --device "$DEVICE" --shapes "$SHAPES" --layouts "$LAYOUTS" \
    --repeat "$REPEAT" 2>&1 | tee "$LOGS/bundles.log" || status=1
fi
# the per-row logit adjustments of sampled requests on the device (a few seconds): batch-wide against the
# loop over rows, which synchronized with the device for every row
timeout "${SAMPLER_LIMIT:-30}" $PY sampler.py --device "$DEVICE" --rows "${SAMPLER_ROWS:-64}" --prompt "${SAMPLER_PROMPT:-1024}" \
  2>&1 | tee "$LOGS/sampler.log" || status=1
exit $status
