"""Checkpoint folders and run files are replaced whole, pruned by step, and read back or refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opd_local import atomic_files, checkpoint
from opd_local.atomic_files import replace_directory
from opd_local.checkpoint import checkpoint_problem, newest_intact_checkpoint, save_training_state
from opd_local.config import Config
from opd_local.config_files import save_yaml
from opd_local.config_parsing import ConfigError, parse_config
from opd_local.metrics import drop_records_from


class _OneProcess:
    rank, world_size, is_main = 0, 1, True


@pytest.fixture
def saver(micro_model_dir):
    """save(run_dir, step, keep): a micro student's training state saved as a checkpoint."""
    from opd_local.optimizer import build_optimizer
    from opd_local.models import load_student

    cfg = Config()
    student = load_student(micro_model_dir, cfg.model, torch.float32, 0)
    optimizer, scheduler = build_optimizer(student, cfg.optim)
    progress = {"stream": {}, "cumulative": {}}
    return lambda run, step, keep: save_training_state(run, step, student, optimizer, scheduler, progress, _OneProcess(), keep)


def _names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_pruning_keeps_the_checkpoint_just_saved_over_a_damaged_newer_one(saver, tmp_path):
    run = tmp_path / "run"
    saver(run, 8, 0)
    saver(run, 10, 0)
    weights = run / "checkpoints" / "step-000010" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.warns(UserWarning, match="skipping a damaged checkpoint"):
        assert newest_intact_checkpoint(run)[0].name == "step-000008"

    saver(run, 9, 1)  # the resumed run saves the step after the one it resumed from

    # By name, step-000010 would have been kept as the newest and step-000009 pruned.
    assert _names(run) == ["latest", "step-000009"]
    assert (run / "checkpoints" / "latest").read_text() == "step-000009"
    assert newest_intact_checkpoint(run)[0].name == "step-000009"


def test_pruning_orders_by_step_not_by_name(saver, tmp_path):
    run = tmp_path / "run"
    for step in (999_999, 1_000_000, 1_000_001):  # the name grows a digit: "step-1000000" < "step-999999"
        saver(run, step, 2)
    assert _names(run) == ["latest", "step-1000000", "step-1000001"]
    assert newest_intact_checkpoint(run)[0].name == "step-1000001"


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "weights.txt").write_text(text)
    return path


def test_replacing_a_folder_never_moves_the_old_one_away(tmp_path, monkeypatch):
    target = _folder(tmp_path / "final", "old")
    new = _folder(tmp_path / ".final-tmp", "new")
    renamed = []
    original_rename = Path.rename
    monkeypatch.setattr(Path, "rename", lambda self, to: renamed.append(self) or original_rename(self, to))

    replace_directory(new, target)

    assert (target / "weights.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # the old folder is deleted, nothing left aside
    assert target not in renamed  # swapped in one step: at every moment `final` held a whole model


def test_replacing_a_folder_without_the_swap_still_ends_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic_files, "_exchange", lambda a, b: False)  # a kernel or file system without RENAME_EXCHANGE
    target = _folder(tmp_path / "final", "old")
    replace_directory(_folder(tmp_path / ".final-tmp", "new"), target)
    assert (target / "weights.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


@pytest.mark.parametrize("kind", ["link", "file"])
def test_a_link_or_file_in_the_folders_place_is_replaced(tmp_path, kind):
    target = tmp_path / "final"
    if kind == "link":
        target.symlink_to(_folder(tmp_path / "elsewhere", "old"))
    else:
        target.write_text("not a model")
    replace_directory(_folder(tmp_path / ".final-tmp", "new"), target)
    assert target.is_dir() and not target.is_symlink() and (target / "weights.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == (["elsewhere", "final"] if kind == "link" else ["final"])


def test_a_file_system_that_cannot_flush_folders_still_saves(tmp_path, monkeypatch):
    import errno
    import os

    real_fsync = os.fsync

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EINVAL, "Invalid argument")  # what some network and FUSE mounts answer
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = _folder(tmp_path / "final", "old")
    replace_directory(_folder(tmp_path / ".final-tmp", "new"), target)
    assert (target / "weights.txt").read_text() == "new"


@pytest.mark.parametrize("header", [b"[]", b'{"w": {"dtype": "F32", "shape": [1]}}', b'{"w": 3}'])
def test_a_safetensors_header_without_offsets_is_a_damaged_checkpoint(saver, tmp_path, header):
    run = tmp_path / "run"
    folder = saver(run, 1, 0)
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert checkpoint_problem(folder) == f"{folder / 'model.safetensors'}: not a safetensors file (header lacks the tensors' data_offsets)"


def test_the_saved_config_is_written_whole_and_an_empty_one_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = parse_config(["--lr", "0.001"])
    save_yaml(cfg, run / "config.yaml")
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]  # no temporary file left beside it
    assert parse_config(["--resume", str(run)]).optim.lr == 0.001

    (run / "config.yaml").write_text("")  # what an interrupted in-place write used to leave
    with pytest.raises(ConfigError, match="the run's saved config is empty"):
        parse_config(["--resume", str(run)])


def test_a_log_line_cut_off_mid_write_is_dropped_on_resume(tmp_path):
    log = tmp_path / "metrics.jsonl"
    records = [json.dumps({"step": step, "loss": 0.5}) for step in range(3)]
    log.write_text("\n".join(records) + "\n" + records[0][:9])  # killed while appending step 3

    with pytest.warns(UserWarning, match=r"metrics.jsonl:4: dropping the last line, cut off"):
        drop_records_from(tmp_path, 2)

    assert log.read_text() == records[0] + "\n" + records[1] + "\n"


def test_a_broken_log_line_before_the_last_is_refused_by_file_and_line(tmp_path):
    log = tmp_path / "trace_eval.jsonl"
    log.write_text('{"step": 0}\n{"step": 1, \n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"trace_eval.jsonl:2: not a JSON record"):
        drop_records_from(tmp_path, 1)
    assert log.read_text() == '{"step": 0}\n{"step": 1, \n{"step": 2}\n'  # left as it was


def test_the_logs_reach_the_disk_before_the_checkpoint_that_follows_them(micro_model_dir, tmp_path, monkeypatch):
    import os

    from opd_local.loop import train
    from test_loop import tiny_config

    events = []
    real_fsync, real_replace = os.fsync, checkpoint.replace_directory
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(checkpoint, "replace_directory", lambda new, target: events.append(("replace", str(target))) or real_replace(new, target))
    cfg = tiny_config(micro_model_dir, tmp_path / "run")
    cfg.run.steps, cfg.run.save_every, cfg.run.save_final = 1, 1, False
    run = train(cfg)

    metrics_flushed = events.index(("fsync", str(run.resolve() / "metrics.jsonl")))
    assert metrics_flushed < events.index(("replace", str(run / "checkpoints" / "step-000001")))
