"""scripts/gpu_check.sh refuses, with one line and a non-zero status, where no CUDA device is visible."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_refuses_without_cuda(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)  # hides a GPU if this machine has one
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(out)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no CUDA device" in proc.stderr
    assert not out.exists()  # nothing was run or written
