"""A run directory has one owner: a second process is refused naming the holder, and a killed holder's lock is taken over."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from opd_local.cli import EXIT_REFUSED, train_main
from opd_local.config import Config
from opd_local.run_directory import REPLACED, Overwrite, claim_run_directory, run_artefacts
from opd_local.run_lock import LOCK_FILE, RunDirectoryBusy, RunDirectoryLock

HOLD = "import sys, time; from opd_local.run_lock import RunDirectoryLock; RunDirectoryLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/run's lock, as a live run does."""
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield run, process
    process.kill()
    process.wait()


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(holder):
    run, process = holder
    with pytest.raises(RunDirectoryBusy, match=f"is in use by pid {process.pid} on host {socket.gethostname()}"):
        RunDirectoryLock(run).acquire()
    process.send_signal(signal.SIGKILL)
    process.wait()
    with RunDirectoryLock(run) as lock:  # the kernel let go of the dead process's lock
        assert lock.holder()["pid"] == os.getpid()
    assert not (run / LOCK_FILE).exists()


def test_a_run_an_overwrite_and_a_resume_into_a_directory_another_process_holds_are_refused(micro_model_dir, tmp_path, capsys):
    from test_refusals import snapshot

    run = tmp_path / "run"
    args = ["--student", micro_model_dir, "--sampler", "hf", "--out_dir", str(run), "--steps", "1", "--groups_per_step", "1",
            "--samples_per_group", "2", "--max_tokens", "4", "--save_every", "1", "--eval.every", "0", "--save_final", "false"]
    assert train_main(args) == 0
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        before = snapshot(run)
        capsys.readouterr()
        assert train_main([*args, "--seed", "1", "--overwrite"]) == EXIT_REFUSED
        assert train_main(["--resume", str(run), "--steps", "2"]) == EXIT_REFUSED
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 2 and all(f"is in use by pid {process.pid} on host {socket.gethostname()}" in e for e in errors), errors
        assert snapshot(run) == before
    finally:
        process.kill()
        process.wait()


def test_a_refused_new_run_leaves_no_directory_behind(tmp_path):
    lock = RunDirectoryLock(tmp_path / "new" / "run")
    lock.acquire()
    assert (tmp_path / "new" / "run" / LOCK_FILE).is_file()
    lock.release()
    assert not (tmp_path / "new" / "run").exists() and (tmp_path / "new").is_dir()


def test_an_overwrite_stopped_before_its_run_stood_is_undone_at_the_next_claim(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000004").mkdir(parents=True)
    (run / "checkpoints" / "step-000004" / "progress.json").write_text("old")
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    Overwrite.set_aside(run)
    (run / "metrics.jsonl").write_text("the new run's, half written")  # then the process was killed
    assert [p.name for p in run_artefacts(run)] == ["metrics.jsonl"]

    cfg = Config()
    cfg.run.out_dir = str(run)
    with pytest.warns(UserWarning, match="an --overwrite was stopped before its run stood"):
        claim_run_directory(cfg).release()

    assert (run / "metrics.jsonl").read_text() == '{"step": 0}\n'
    assert (run / "checkpoints" / "step-000004" / "progress.json").read_text() == "old"
    assert not (run / REPLACED).exists() and not (run / LOCK_FILE).exists()
