#!/usr/bin/env bash
# Realistic sizes on one GPU, well inside 10 minutes on an H100 (about 4 minutes expected):
#   1. RoBERTa-large (24 layers), 8 x 512 tokens, fp32: saved bytes, CUDA peak memory, interleaved step
#      times, and saved bytes vs depth (6/12/24/48) and vs sequence length (128/256/512);
#   2. OPT-1.3B (24 layers), 4 x 512 tokens, bf16 weights (streams stay fp32): saved bytes, peak, times.
# Peak memory is torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus what was allocated
# once the model was built (benchmarks/measure.py).
#
# Usage, from the repository root:
#   bash benchmarks/gpu.sh [OUT_DIR]                # OUT_DIR defaults to $OUT, else output/bench_gpu
#   DEVICE=cpu SMOKE=1 bash benchmarks/gpu.sh DIR   # the same code path on CPU with tiny shapes (~3 min)
# On the lent GPU machine (its python3 has torch but transformers 5.17): carry wheels of the versions this
# project needs (pure Python) and put them first on the path, e.g. here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl transformers==5.24.0 peft==0.21.2
# and run there with carry [".whl"]: PYTHON=python3 bash benchmarks/gpu.sh "$OUT"
# (the script installs .whl/*.whl into /tmp/site when the folder exists). Report the card by name.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-output/bench_gpu}}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEVICE=${DEVICE:-cuda}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p "$OUT_DIR"

if [ "${SMOKE:-0}" = 1 ]; then
  ENCODER=(--shape tiny-roberta --layers 4 --batch-size 2 --seq-len 32 --depths 2,4 --seq-lens 16,32)
  DECODER=(--shape tiny-opt --layers 4 --batch-size 2 --seq-len 32)
else
  ENCODER=(--shape roberta-large --batch-size 8 --seq-len 512 --depths 6,12,24,48 --seq-lens 128,256,512)
  DECODER=(--shape opt-1.3b --batch-size 4 --seq-len 512 --dtype bfloat16)
fi

"$PYTHON" - <<'EOF'
import torch, transformers, peft
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
EOF

# --keep-going: a method that fails (e.g. out of memory) is listed in the report instead of ending the run;
# a run that fails as a whole does not stop the next one.
COMMON=(--device "$DEVICE" --timing-rounds 5 --peak-steps 3 --peak-in-process --keep-going)
"$PYTHON" -m benchmarks.bench_memory "${COMMON[@]}" "${ENCODER[@]}" --sections count,timing,peak,depth,seq \
  --out-dir "$OUT_DIR/encoder" 2>&1 | tee "$OUT_DIR/encoder.log" || echo "encoder run FAILED" | tee -a "$OUT_DIR/encoder.log"
"$PYTHON" -m benchmarks.bench_memory "${COMMON[@]}" "${DECODER[@]}" --sections count,timing,peak \
  --out-dir "$OUT_DIR/decoder" 2>&1 | tee "$OUT_DIR/decoder.log" || echo "decoder run FAILED" | tee -a "$OUT_DIR/decoder.log"
