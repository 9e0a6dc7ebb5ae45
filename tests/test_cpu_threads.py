"""opd_local/cpu_threads.py: OpenMP defaults set before torch loads; a user's own setting wins."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from opd_local.cpu_threads import SPIN_COUNT, configure_cpu_threads

ROOT = Path(__file__).resolve().parents[1]


def test_sets_a_short_spin_when_the_user_set_nothing():
    environ = {}
    assert configure_cpu_threads(environ) == {"GOMP_SPINCOUNT": SPIN_COUNT}
    assert environ == {"GOMP_SPINCOUNT": SPIN_COUNT}


@pytest.mark.parametrize("own", [{"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"}])
def test_the_users_own_setting_wins(own):
    # libgomp lets GOMP_SPINCOUNT override OMP_WAIT_POLICY: a policy alone must stay alone.
    environ = dict(own)
    assert configure_cpu_threads(environ) == {}
    assert environ == own


def test_off_leaves_the_environment_alone():
    environ = {"OPD_LOCAL_CPU_THREADS": "off"}
    assert configure_cpu_threads(environ) == {}
    assert environ == {"OPD_LOCAL_CPU_THREADS": "off"}


def test_train_script_sets_the_default_before_torch_is_imported():
    """scripts/train.py sets the spin count while torch (and so libgomp, which reads it once) is not loaded."""
    code = (
        "import os, sys, runpy\n"
        "import opd_local.cpu_threads as ct\n"
        "seen = {}\n"
        "real = ct.configure_cpu_threads\n"
        "def spy(*a, **k):\n"
        "    seen['torch_loaded'] = 'torch' in sys.modules\n"
        "    return real(*a, **k)\n"
        "ct.configure_cpu_threads = spy\n"
        "sys.argv = ['train.py', '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(ROOT / 'scripts' / 'train.py')!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(seen, os.environ.get('GOMP_SPINCOUNT'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OPD_LOCAL_CPU_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == f"{{'torch_loaded': False}} {SPIN_COUNT}"
