"""scripts/exact_cuda_check.py on the CPU: the code path of scripts/gpu_check.sh's exact_sdpa section.

On the CPU the math and flash SDPA backends run (efficient and cuDNN are CUDA only and recorded as
unsupported): under each, and unpinned, reversible and vanilla gradients of a bf16 OPT and LLaMA with the
exact arithmetic must be bit-identical. The whole GPU script's CPU smoke run takes minutes, so it is not
in the suite (`DEVICE=cpu SMOKE=1 bash scripts/gpu_check.sh DIR`, docs/training.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_exact_reconstruction_under_each_sdpa_backend_on_cpu(tmp_path):
    out = tmp_path / "exact.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "exact_cuda_check.py"), "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    status = {(c["family"], c["backend"]): c["status"] for c in result["cases"]}
    for family in ("opt", "llama"):
        assert status[(family, "unpinned")] == status[(family, "math")] == "pass", status
    assert all(s in ("pass", "unsupported") for s in status.values()), status
