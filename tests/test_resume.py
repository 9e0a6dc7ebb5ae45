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


# ---------------------------------------------------------------- resume is exact or refused (in process, micro model)


def _micro_args(model, out, *extra):
    return [
        "--student", model, "--sampler", "hf", "--out_dir", str(out), "--groups_per_step", "2", "--samples_per_group", "2",
        "--max_tokens", "6", "--max_train_rows", "8", "--max_heldout_rows", "2", "--eval.every", "0", "--save_every", "1",
        *extra,
    ]


def _comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "sync/push"))} for r in records]


def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(micro_model_dir, tmp_path, capsys):
    from opd_local.cli import train_main
    from opd_local.metrics import read_metrics

    out = tmp_path / "run"
    assert train_main(_micro_args(micro_model_dir, out, "--steps", "2", "--save_final", "false")) == 0
    uninterrupted = _comparable(read_metrics(out))
    weights = out / "checkpoints" / "step-000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    capsys.readouterr()

    assert train_main(["--resume", str(out)]) == 0

    err = capsys.readouterr().err
    assert f"warning: skipping a damaged checkpoint: {weights}: truncated" in err and "resuming from step-000001" in err
    assert _comparable(read_metrics(out)) == uninterrupted  # step 1 redone from step 1's checkpoint, to the same numbers


def test_flags_given_with_resume_are_applied_and_recorded(micro_model_dir, tmp_path, capsys):
    import yaml

    from opd_local.cli import train_main
    from opd_local.metrics import read_metrics

    out = tmp_path / "run"
    assert train_main(_micro_args(micro_model_dir, out, "--steps", "2", "--lr", "1e-3", "--save_final", "false")) == 0
    capsys.readouterr()

    assert train_main(["--resume", str(out), "--steps", "3", "--lr", "5e-4", "--beta1", "0.5"]) == 0

    assert "at step 2 with optim.lr 0.001 -> 0.0005, optim.beta1 0.9 -> 0.5, run.steps 2 -> 3" in capsys.readouterr().err
    records = read_metrics(out)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[1]["optim/lr"] == 1e-3 and records[2]["optim/lr"] == 5e-4  # the restored scheduler kept 1e-3
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["optim"]["lr"], saved["optim"]["beta1"], saved["run"]["steps"]) == (5e-4, 0.5, 3)
    state = torch.load(out / "checkpoints" / "step-000003" / "optimizer.pt", weights_only=True)
    assert [tuple(g["betas"]) for g in state["optimizer"]["param_groups"]] == [(0.5, 0.95)]


def test_overwrite_replaces_the_old_run_and_keeps_other_files(micro_model_dir, tmp_path):
    import os

    from opd_local.cli import train_main
    from opd_local.metrics import read_metrics

    out = tmp_path / "run"
    assert train_main(_micro_args(micro_model_dir, out, "--steps", "2", "--save_final", "false")) == 0
    (out / "train.log").write_text("a sweep's own log\n")
    assert train_main(_micro_args(micro_model_dir, out, "--steps", "1", "--overwrite")) == 0
    assert [r["step"] for r in read_metrics(out)] == [0]  # not appended to the old run's
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000001"]
    assert (out / "train.log").read_text() == "a sweep's own log\n"
    assert not list(out.glob(".opd-local-*"))  # neither the replaced run kept aside nor the lock is left
    # the exported model is readable by whoever the umask lets read: not 0700 and 0600
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "final").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "final" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_resume_redoes_the_step_whose_metrics_line_was_cut_off(micro_model_dir, tmp_path, capsys):
    from opd_local.cli import train_main
    from opd_local.metrics import read_metrics

    out = tmp_path / "run"
    assert train_main(_micro_args(micro_model_dir, out, "--steps", "3", "--save_final", "false")) == 0
    uninterrupted = _comparable(read_metrics(out))
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    # step 2's line half written, as a crash (or a full disk) while appending it leaves it; checkpoint 3 is whole
    (out / "metrics.jsonl").write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    capsys.readouterr()

    assert train_main(["--resume", str(out)]) == 0

    err = capsys.readouterr().err
    assert "has no record of step 2: resuming from step-000002 to redo it" in err, err
    assert _comparable(read_metrics(out)) == uninterrupted  # steps 0, 1, 2: step 2 redone to the same numbers
