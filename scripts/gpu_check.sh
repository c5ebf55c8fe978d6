#!/usr/bin/env bash
# bash scripts/gpu_check.sh            (on a machine with at least one NVIDIA GPU; OUT=<dir> for the results)
#
# The fp16 checks that cannot run on the CPU machines (DeepSpeed refuses fp16 there): launch/train.py on the
# real MiniLM and the SST-2 sample, MEFT, 1 GPU, ZeRO 1/2/3 with the fp16 presets (dynamic loss scaling)
# next to ZeRO-2 bf16, 120 steps each. Passes when every fp16 run has finite losses, its loss falls, and
# its dev accuracy is within 3 points of the bf16 run's; and scripts/overflow_step_check.py --precision fp16
# (an Inf inside a reversible layer's F: the step is skipped, the loss scale drops; $OUT/overflow_fp16.json). Writes $OUT/<run>/results.json (with peak GPU
# memory), $OUT/<run>.log and $OUT/summary.json; exits non-zero on failure. About 5 minutes on one H100,
# most of it DeepSpeed compiling its fused Adam once.
# Install first if needed: MEFT_TORCH=torch bash scripts/bootstrap.sh (the CUDA build of torch).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/output/gpu_check}"
mkdir -p "$OUT"
export PATH="${MEFT_VENV:-$ROOT/.venv}/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${MEFT_VENV:-$ROOT/.venv}/torch_extensions}"
nvidia-smi -L | tee "$OUT/device.txt"
COMMON=(--max_steps 120 --per_device_train_batch_size 32 --learning_rate 3e-3 --warmup_ratio 0.1
        --logging_steps 10 --overwrite_output_dir)
status=0
for preset in zero2_bf16 zero1_fp16 zero2_fp16 zero3_fp16; do
  deepspeed --num_gpus 1 --master_port 29700 launch/train.py --deepspeed "$preset" \
    --output_dir "$OUT/$preset" "${COMMON[@]}" > "$OUT/$preset.log" 2>&1 || { echo "$preset failed"; status=1; }
done
# A forward overflow (Inf in one reversible layer's F output) under fp16: the step is skipped, the loss scale drops.
python scripts/overflow_step_check.py --precision fp16 --out "$OUT/overflow_fp16.json" > "$OUT/overflow_fp16.log" 2>&1 \
  || { echo "overflow_step_check fp16 failed"; status=1; }
python - "$OUT" <<'PY' || status=1
import json, math, sys
from pathlib import Path
out = Path(sys.argv[1])
summary, ok = {}, True
for run in ("zero2_bf16", "zero1_fp16", "zero2_fp16", "zero3_fp16"):
    try:
        results = json.loads((out / run / "results.json").read_text())
        state = json.loads((out / run / "trainer_state.json").read_text())
    except FileNotFoundError:
        summary[run], ok = "missing", False
        continue
    losses = [e["train/loss"] for e in state["log_history"] if "train/loss" in e]
    summary[run] = {"accuracy": results["eval"]["validation"]["accuracy"], "first_loss": losses[0],
                    "last_loss": losses[-1], "finite": all(math.isfinite(x) for x in losses),
                    "steps_per_second": results["train_steps_per_second"],
                    "peak_gpu_memory_bytes": results["peak_gpu_memory_bytes_per_rank"]}
reference = summary.get("zero2_bf16", {}).get("accuracy", 0.0) if isinstance(summary.get("zero2_bf16"), dict) else 0.0
for run, values in summary.items():
    if run.endswith("fp16") and isinstance(values, dict):
        values["pass"] = values["finite"] and values["last_loss"] < values["first_loss"] and values["accuracy"] > reference - 0.03
        ok = ok and values["pass"]
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
sys.exit(0 if ok else 1)
PY
exit $status
