"""How the ranks hold the student: `run.parallel` resolved against the world size and the model's size."""

import pytest

from opd_local import distributed


def test_layout_resolution():
    assert distributed.resolve_layout("auto", 10**9, 10**9, 8) == "ddp"
    assert distributed.resolve_layout("auto", 10**9 + 1, 10**9, 8) == "fsdp"
    assert distributed.resolve_layout("fsdp", 10, 10**9, 2) == "fsdp"
    assert distributed.resolve_layout("fsdp", 10, 10**9, 1) == "none"  # one process trains the whole model
    with pytest.raises(ValueError, match="choose one of auto, none, ddp, fsdp"):
        distributed.resolve_layout("zero3", 10, 10**9, 2)


def test_one_process_per_rank_with_no_layout_is_refused_before_anything_starts(monkeypatch):
    from opd_local.config import Config
    from opd_local.preflight import check_config

    cfg = Config()
    cfg.run.parallel = "none"
    check_config(cfg)  # a single process trains the whole model
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="run.parallel=none with 2 ranks"):
        check_config(cfg)
