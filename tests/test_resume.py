"""A run killed with SIGKILL mid-step and resumed ends exactly where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file


def _cmd(tiny_model_dir, out, *extra):
    return [
        sys.executable, "scripts/train.py", "--student", tiny_model_dir, "--sampler", "hf", "--steps", "4",
        "--groups_per_step", "2", "--samples_per_group", "2", "--max_tokens", "10", "--max_train_rows", "16",
        "--max_heldout_rows", "2", "--lr", "1e-3", "--save_every", "1", "--eval.every", "2", "--eval.train_rows", "2",
        "--eval.max_trace_tokens", "8", "--eval.greedy_max_tokens", "8", "--run.device", "cpu", "--out_dir", str(out), *extra,
    ]


def _records(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "sync/push"))} for r in records]


def test_sigkill_mid_step_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(_cmd(tiny_model_dir, reference), check=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(tiny_model_dir, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 600
    # Kill as soon as step 1 is logged: the process is then checkpointing step 1 or inside step 2.
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(l)["step"] == 1 for l in metrics.read_text().splitlines() if l.strip()):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "final").exists()

    subprocess.run([sys.executable, "scripts/train.py", "--resume", str(killed)], check=True, timeout=600)

    assert _records(killed) == _records(reference)
    assert (killed / "trace_eval.jsonl").read_text() == (reference / "trace_eval.jsonl").read_text()
    want, got = load_file(str(reference / "final" / "model.safetensors")), load_file(str(killed / "final" / "model.safetensors"))
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    # only the newest checkpoints are kept
    assert sorted(p.name for p in (killed / "checkpoints").glob("step-*")) == ["step-000003", "step-000004"]
