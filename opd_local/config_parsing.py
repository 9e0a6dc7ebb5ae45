"""From text to a checked Config: YAML files, `--section.key value` flags, and every setting's check.

YAML files override the defaults of `opd_local/config.py`; `--section.key value` (or `--key value`
where the key name is unique across sections) overrides YAML. `--help` lists every knob.

One rule for repeats: a setting given twice is refused, whether as a key twice in one YAML mapping or
as a flag twice on the command line (`--max_tokens 8 --max_tokens 12`, or two spellings of one
setting, `--optim.lr 1e-4 --lr 5e-4`). `--config` is the exception: it may be given more than once,
and the files apply in order, a later file overriding an earlier one key by key
(`--config base.yaml --config exp.yaml`). With `--resume`, the run's saved config comes first, then
the `--config` files in order, then the flags.

YAML is read strictly by `config_files`. No error message prints a value in full: long ones are
shortened. The rules between settings are `preflight`'s.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import operator
import types
import typing
from pathlib import Path
from typing import Any, Literal

from opd_local.config import Config, ConfigError
from opd_local.config_files import clip_text as _clip
from opd_local.config_files import load_saved_yaml, load_yaml, short_value


def _sections(cfg: Config):
    for section in dataclasses.fields(cfg):
        yield section.name, getattr(cfg, section.name)


def _field_type(section_obj: Any, name: str) -> type:
    hints = typing.get_type_hints(type(section_obj))
    return hints[name]


def _choices(typ: type) -> tuple | None:
    return typing.get_args(typ) if typing.get_origin(typ) is Literal else None


def _coerce(value: Any, typ: type, where: str) -> Any:
    """`value` (command-line text or a YAML scalar) as `typ`.

    Nothing is truncated, stringified or matched loosely: 2.5 is not an int, YAML null is not the
    text "None", and "CPU" or "gpu" is not the choice "cpu".
    """
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    choices = _choices(typ)
    if choices is not None:
        if isinstance(value, bool) and str(value).lower() in choices:
            return str(value).lower()  # YAML reads `enforce_eager: true` as a boolean
        if value not in choices:
            raise ConfigError(f"{where}: {'null' if value is None else short_value(value)} is not one of {', '.join(choices)}")
        return value
    if value is None:
        hint = ' (write "" for empty)' if typ is str else ""
        raise ConfigError(f"{where}: expected {_KINDS.get(typ, typ.__name__)}, got null{hint}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, str) else None
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {short_value(value)}")
    if typ is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        number = value
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return int(value)
            with contextlib.suppress(ValueError):
                number = float(value)
        if isinstance(number, float) and number.is_integer():  # "1e9" for a parameter count
            return int(number)
        raise ConfigError(f"{where}: expected an integer, got {short_value(value)}")
    if typ is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {short_value(value)}") from None
        except OverflowError:  # an integer past the float range
            raise ConfigError(f"{where}: expected a finite number, got {short_value(value)}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {short_value(value)}")
        return number
    if typ is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: expected {_KINDS.get(typ, typ.__name__)}, got {short_value(value)}")


PATH_LIMIT = 300  # a path in an error line is shortened past this many characters, a value past 60

_KINDS = {int: "an integer", float: "a number", str: "text", bool: "true or false"}
_BOUNDS = (("ge", operator.ge, "at least"), ("gt", operator.gt, "above"), ("le", operator.le, "at most"), ("lt", operator.lt, "below"))


def _check_value(value: Any, f: dataclasses.Field, where: str) -> None:
    if f.metadata.get("nonempty") and not str(value).strip():
        raise ConfigError(f"{where}: must not be empty")
    for key, holds, words in _BOUNDS:
        bound = f.metadata.get(key)
        if bound is not None and not holds(value, bound):
            raise ConfigError(f"{where}: {short_value(value)} must be {words} {bound}")


def _set_field(section: Any, f: dataclasses.Field, value: Any, where: str) -> None:
    value = _coerce(value, _field_type(section, f.name), where)
    _check_value(value, f, where)
    setattr(section, f.name, value)


def check_fields(cfg: Config) -> Config:
    """Every setting's type, range and choice, for configs built in code as for parsed ones; raises
    ConfigError. The rules between settings are `preflight.check_config`'s."""
    for section_name, section in _sections(cfg):
        for f in dataclasses.fields(section):
            _set_field(section, f, getattr(section, f.name), f"{section_name}.{f.name}")
    return cfg


def apply_overrides(cfg: Config, overrides: dict[str, dict[str, Any]], source: str) -> Config:
    """Set `overrides[section][key]` on `cfg`, each checked; unknown sections or keys are errors."""
    sections = dict(_sections(cfg))
    if not isinstance(overrides or {}, dict):
        raise ConfigError(f"{source}: must be a mapping of sections, got {type(overrides).__name__}")
    for section_name, values in (overrides or {}).items():
        if section_name not in sections:
            raise ConfigError(f"{source}: unknown config section {short_value(section_name)}; known: {sorted(sections)}")
        section = sections[section_name]
        if not isinstance(values or {}, dict):
            raise ConfigError(f"{source}: section {short_value(section_name)} must be a mapping of keys, got {short_value(values)}")
        fields = {f.name: f for f in dataclasses.fields(section)}
        for key, value in (values or {}).items():
            if key not in fields:
                raise ConfigError(f"{source}: unknown key {_clip(f'{section_name}.{key}')}; known: {sorted(fields)}")
            where = f"--{section_name}.{key}" if source == "command line" else f"{source}: {section_name}.{key}"
            _set_field(section, fields[key], value, where)
    return cfg


# Settings that decide which model trains on which rows in which order: a resume that changed them
# would continue another run from this one's weights and data cursor.
FIXED_ON_RESUME = ("model.", "data.", "run.seed")
CHANGEABLE_ON_RESUME = (
    "model.teacher_placement", "model.teacher_offload_dir", "model.teacher_shared_prefix", "model.student_shared_prefix", "model.attn_implementation",
    "model.cache_dir",
)


def flatten(cfg: Config) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in cfg.to_dict().items() for key, value in values.items()}


def resume_changes(saved: Config, cfg: Config) -> dict[str, tuple[Any, Any]]:
    """Settings `cfg` changes from the run's saved config, as {key: (saved, now)}; refuses the fixed ones."""
    before, after = flatten(saved), flatten(cfg)
    ignored = ("run.resume", "run.out_dir", "run.overwrite", "run.verbose")
    changes = {key: (before[key], after[key]) for key in after if before[key] != after[key] and key not in ignored}
    for key, (old, new) in changes.items():
        if key.startswith(FIXED_ON_RESUME) and key not in CHANGEABLE_ON_RESUME:
            raise ConfigError(
                f"--{key} {short_value(new, PATH_LIMIT)} differs from the run's {short_value(old, PATH_LIMIT)}: a resume continues the "
                "same model, data and seed; start a new run (another run.out_dir) to change it"
            )
    return changes


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print its usage block and exit; one line says it
        raise ConfigError(f"command line: {_clip(message, 2 * PATH_LIMIT)} (--help lists every flag)")


_GIVEN = "_flags_given"  # in the namespace: {dest: (spelling, value)} of each setting's flag so far


class _Once(argparse.Action):
    """Stores a setting's value, refusing a second one: a flag given twice, in one spelling or two
    (`--optim.lr` and `--lr`), is as ambiguous as a YAML key given twice. The parser's default is
    SUPPRESS, so a dest is in the namespace only once its flag was given."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, _GIVEN, None)
        if given is None:
            given = {}
            setattr(namespace, _GIVEN, given)
        if self.dest in given:
            first, value = given[self.dest]
            value, values = _clip(str(value), PATH_LIMIT), _clip(str(values), PATH_LIMIT)
            both = f"{value}, then {values}" if first == option_string else f"{first} {value}, then {option_string} {values}"
            raise ConfigError(f"command line: --{self.dest} is given twice ({both}); give each setting once")
        given[self.dest] = (option_string, values)
        setattr(namespace, self.dest, values)


def build_arg_parser(description: str) -> argparse.ArgumentParser:
    """A parser with `--config` plus one `--section.key` flag per field (and `--key` where unique)."""
    parser = _Parser(
        description=description,
        allow_abbrev=False,  # `--temp` must not silently mean --temperature
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config",
        action="append",
        help="YAML file of overrides, by section; may be given more than once: the files apply in order, a later "
        "one overriding an earlier one key by key, and the flags override them all (every other flag is refused "
        "when given twice)",
    )
    parser.add_argument("--debug", action="store_true", help="on an error, print the traceback instead of one line")
    defaults = Config()
    counts: dict[str, int] = {}
    for _, section in _sections(defaults):
        for f in dataclasses.fields(section):
            counts[f.name] = counts.get(f.name, 0) + 1
    for section_name, section in _sections(defaults):
        group = parser.add_argument_group(section_name)
        for f in dataclasses.fields(section):
            flags = [f"--{section_name}.{f.name}"]
            if counts[f.name] == 1 and f.name not in ("config", "debug"):
                flags.append(f"--{f.name}")
            typ = _field_type(section, f.name)
            choices = _choices(typ)
            extra = {"nargs": "?", "const": "true"} if typ is bool else {}  # `--overwrite` alone means true
            group.add_argument(
                *flags,
                dest=f"{section_name}.{f.name}",
                metavar="{" + ",".join(choices) + "}" if choices else type(getattr(section, f.name)).__name__.upper(),
                help=f"{f.metadata['help']} (default: {getattr(section, f.name)!r})",
                action=_Once,
                **extra,
            )
    return parser


def parse_config(argv: list[str] | None = None, description: str = "opd-local") -> Config:
    """Defaults, then each `--config` YAML in order, then CLI flags; every setting checked as it is set
    (ConfigError names the bad one), the rules between settings left to `preflight.check_config`. A flag given twice is refused; a later `--config` file overrides an earlier one.

    With `--resume RUN_DIR` the run's saved config.yaml takes the place of the defaults, so the
    resumed run is the same run; `--config` files and flags given alongside override it, and train()
    refuses those that would make it another run.
    """
    parser = build_arg_parser(description)
    args = vars(parser.parse_args(argv))
    args.pop("debug", None)
    args.pop(_GIVEN, None)
    cfg = Config()
    resume = args.get("run.resume")
    if resume:
        saved = Path(resume) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {resume}: no config.yaml there; is it a run directory?")
        apply_overrides(cfg, load_saved_yaml(saved), source=str(saved))
        cfg.run.out_dir = str(resume)
        cfg.run.overwrite = False  # the action that started that run, not part of continuing it
    for path in args.pop("config", []):  # in order: a later file overrides an earlier one, key by key
        apply_overrides(cfg, load_yaml(path), source=path)
    cli: dict[str, dict[str, Any]] = {}
    for dotted, value in args.items():
        section, key = dotted.split(".", 1)
        cli.setdefault(section, {})[key] = value
    return apply_overrides(cfg, cli, source="command line")
