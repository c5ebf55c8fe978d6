"""The package built as a wheel and installed (not editable) works from outside the checkout: the DeepSpeed
presets and the SST-2 sample are package data, `python -m meft_ds.train` is the entry point.

The fresh environment gets nothing from the network: the wheel is installed with --no-deps --no-index,
and afterwards a .pth file points the environment at this one's site-packages for torch, DeepSpeed and
transformers (a venv made from a venv's python would only see the base interpreter's packages).
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import REPO, free_port, launch_env, save_tiny_bert

SKIP = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "output*", "runs", ".pytest_cache")


def _run(command: list, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = launch_env()
    env.pop("PYTHONPATH", None)  # a checkout on the path would hide the installed copy
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (f"{command[:4]} exit {result.returncode}:\n"
                                    f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.mark.slow
def test_wheel_installs_and_trains_outside_the_checkout(tmp_path):
    source = tmp_path / "source"  # a copy, so the build's build/ and *.egg-info stay out of the checkout
    shutil.copytree(REPO, source, symlinks=True, ignore=SKIP)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
          source], cwd=tmp_path, timeout=120)
    (wheel,) = (tmp_path / "dist").glob("meft_ds-*.whl")
    _run([sys.executable, "-m", "venv", "--system-site-packages", tmp_path / "venv"], cwd=tmp_path, timeout=60)
    python = tmp_path / "venv" / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=tmp_path, timeout=120)
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, 30).stdout
    (Path(purelib.strip()) / "parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([python, "-c", "import meft_ds.training.args as a; print(a.__file__); print(a.DEFAULT_DATA_DIR)"],
                 elsewhere, 60).stdout.split()
    assert all(line.startswith(str(tmp_path / "venv")) for line in where), where  # the wheel's copy, not the checkout
    assert "--deepspeed" in _run([python, "-m", "meft_ds.train", "--help"], elsewhere, 60).stdout
    assert (tmp_path / "venv" / "bin" / "meft-train").is_file()

    model = save_tiny_bert(tmp_path / "bert", dropout=0.0)
    # The default data (the packaged SST-2 sample) and the packaged CPU preset, 2 steps.
    _run([python, "-m", "meft_ds.train", "--model_name_or_path", model, "--deepspeed", "cpu", "--max_steps", 2,
          "--max_seq_length", 32, "--per_device_train_batch_size", 8, "--logging_steps", 1,
          "--master_port", free_port(), "--output_dir", elsewhere / "out"], elsewhere, timeout=240)
    assert (elsewhere / "out" / "results.json").is_file()
