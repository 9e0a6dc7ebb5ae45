"""Run configuration: one dataclass tree, the only place defaults live.

YAML files override the defaults; `--section.key value` (or `--key value` where the
key name is unique across sections) overrides YAML. `--help` lists every knob.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import operator
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


def knob(default: Any, help: str, *, ge=None, gt=None, le=None, lt=None, nonempty: bool = False):
    """A config field with its one-line help string and, for numbers and text, the values it accepts."""
    metadata = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "nonempty": nonempty}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
BUNDLED_GSM8K = "bundled:gsm8k"


@dataclass
class ModelConfig:
    student: str = knob(EMBEDDED_MODEL, "student: Hugging Face id, local directory, or the embedded SmolLM2", nonempty=True)
    teacher: str = knob("", "frozen teacher; empty means the student's starting weights")
    teacher_context: Literal["privileged", "plain"] = knob(
        "privileged", "what the teacher sees: privileged (the worked solution too) or plain (the student's prompt: self-distillation)"
    )
    teacher_weights: Literal["auto", "initial", "separate", "base_adapter_off"] = knob(
        "auto",
        "which weights score: initial (a frozen copy of the student's starting weights), separate (model.teacher, "
        "another model with the same tokenizer), base_adapter_off (LoRA: the student's base with the adapter off, no "
        "second copy), auto (separate when model.teacher is set, else base_adapter_off under LoRA, else initial)",
    )
    teacher_placement: Literal["auto", "replica", "shard", "cpu", "disk"] = knob(
        "auto",
        "where a frozen teacher model lives: auto (shard when the student is sharded, else replica), replica (whole on "
        "every rank's device), shard (FSDP2 over the ranks), cpu (decoder layers in host memory, each moved to the GPU "
        "for its own forward, by accelerate), disk (the same from memory-mapped files under model.teacher_offload_dir)",
    )
    teacher_offload_dir: str = knob("", "teacher_placement=disk: where the layers are written; empty means OUT_DIR/teacher-offload")
    teacher_shared_prefix: bool = knob(
        True,
        "teacher scoring: each privileged prompt runs once and its KV cache serves the group's K completions "
        "(a sharded teacher always packs every completion with its own copy of the prompt)",
    )
    trust_remote_code: bool = knob(False, "allow model repos to run their own code")
    dtype: Literal["auto", "float32", "fp32", "bfloat16", "bf16"] = knob(
        "auto",
        "compute dtype: auto (bf16 where the device multiplies in bf16 natively: CUDA, CPUs with AMX-BF16 or "
        "AVX512-BF16; fp32 elsewhere), float32 (fp32) or bfloat16 (bf16); the frozen teacher, the loss inputs and "
        "the rollout engine follow it",
    )
    master_dtype: Literal["float32", "fp32", "bfloat16", "bf16"] = knob(
        "float32",
        "the student's trained weights, gradients and AdamW state: float32, or bfloat16 (half the memory; AdamW "
        "steps below half a bf16 step of a weight are lost)",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = knob("sdpa", "transformers attention backend: sdpa, eager, flash_attention_2")
    cache_dir: str = knob("", "where the embedded model is converted once; empty means ~/.cache/opd-local")
    lora_rank: int = knob(0, "PEFT LoRA rank on the student (0 = train every weight)", ge=0)
    lora_alpha: float = knob(16.0, "LoRA alpha (the update is scaled by alpha / rank)", gt=0)
    lora_dropout: float = knob(0.0, "LoRA dropout", ge=0, lt=1)
    lora_target_modules: str = knob("all-linear", "comma-separated module names to adapt, or all-linear", nonempty=True)


@dataclass
class DataConfig:
    train: str = knob(BUNDLED_GSM8K, "training rows: bundled:gsm8k, a hub id, or a local json/jsonl/parquet path", nonempty=True)
    train_split: str = knob("train", "split of `train` to use", nonempty=True)
    heldout: str = knob(BUNDLED_GSM8K, "held-out rows (never trained on): same forms as `train`", nonempty=True)
    heldout_split: str = knob("test", "split of `heldout` to use", nonempty=True)
    format: Literal["auto", "gsm8k", "messages"] = knob("auto", "row format: auto, gsm8k (question/answer), messages (messages/teacher_messages)")
    hub_config: str = knob("main", "dataset config name passed to datasets.load_dataset for hub ids")
    max_train_rows: int = knob(0, "cap on training rows (0 = all)", ge=0)
    max_heldout_rows: int = knob(16, "cap on held-out rows (0 = all)", ge=0)
    max_prompt_tokens: int = knob(768, "longest allowed prompt; longer rows are refused before step 0, naming the row", ge=1)
    drop_overlong: bool = knob(False, "drop over-long rows and count them instead of refusing the run")
    shuffle: bool = knob(True, "shuffle training rows each epoch (seeded)")


@dataclass
class RolloutConfig:
    sampler: Literal["auto", "vllm", "hf"] = knob("auto", "rollout engine: auto (vllm when installed, else hf), vllm, hf")
    groups_per_step: int = knob(4, "prompt groups per optimizer step (across all ranks)", ge=1)
    samples_per_group: int = knob(2, "completions sampled per prompt (K)", ge=1)
    temperature: float = knob(1.0, "sampling temperature; rollout_lp and student_lp use it, teacher_lp does not", gt=0)
    max_tokens: int = knob(128, "completion length cap", ge=1)
    gpu_memory_utilization: float = knob(0.3, "vLLM on GPU: fraction of GPU memory for the engine", gt=0, le=1)
    kv_cache_gib: int = knob(1, "vLLM on CPU: KV-cache size in GiB", ge=1)
    enforce_eager: Literal["auto", "true", "false"] = knob(
        "auto", "vLLM without torch.compile/CUDA graphs: auto (eager on CPU, where compiling costs minutes; graphs on GPU), true, false"
    )
    max_model_len: int = knob(1024, "vLLM context length (prompt + completion)", ge=1)
    sleep_during_train: bool = knob(True, "vLLM on GPU: free the engine's weights and KV cache while the trainer runs (the next push restores them)")


@dataclass
class LossConfig:
    objective: Literal["sampled_rkl", "full_rkl", "topk_rkl", "fkl", "jsd"] = knob(
        "sampled_rkl",
        "token objective: sampled_rkl (sampled-token reverse KL with IS ratio), full_rkl, topk_rkl, fkl (forward KL), "
        "jsd (generalised JSD); all but sampled_rkl use the full vocabulary from the teacher's hidden states",
    )
    kl_coef: float = knob(1.0, "lambda: scale of the advantage teacher_lp - rollout_lp (of the divergence, for the others)", gt=0)
    log_ratio_cap: float = knob(2.0, "sampled_rkl: cap on student_lp - rollout_lp inside the importance ratio", gt=0)
    importance_ratio: bool = knob(
        True, "sampled_rkl: weight tokens by exp(student_lp - rollout_lp); off means ratio = 1 in value"
    )
    normalize: Literal["token", "sequence"] = knob(
        "token", "token (divide by the step's active tokens) or sequence (mean over completions of per-token means)"
    )
    topk: int = knob(64, "topk_rkl: the student's top-k tokens kept; the rest is one tail bucket", ge=1)
    jsd_beta: float = knob(0.5, "jsd: beta in M = beta p_teacher + (1 - beta) p_student", gt=0, lt=1)
    chunk_tokens: int = knob(1024, "tokens per chunk in the chunked loss (bounds the [chunk, V] fp32 buffer)", ge=1)


@dataclass
class OptimConfig:
    lr: float = knob(5e-5, "AdamW learning rate", gt=0)
    weight_decay: float = knob(0.0, "AdamW weight decay", ge=0)
    beta1: float = knob(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = knob(0.95, "AdamW beta2", ge=0, lt=1)
    eps: float = knob(1e-8, "AdamW epsilon", gt=0)
    warmup_steps: int = knob(0, "linear learning-rate warm-up steps", ge=0)
    grad_clip: float = knob(1.0, "max global gradient norm (0 = off)", ge=0)
    micro_batch_tokens: int = knob(
        0,
        "token budget of one packed micro-batch (prompt + completion); 0 = 1024 on CPU, where the dense "
        "block-diagonal mask grows with the square of the row, and 16384 on CUDA", ge=0
    )


def resolve_micro_batch_tokens(optim: OptimConfig, device_type: str) -> int:
    """`optim.micro_batch_tokens`, with 0 resolved by the device type."""
    if optim.micro_batch_tokens > 0:
        return optim.micro_batch_tokens
    return 16384 if device_type == "cuda" else 1024


@dataclass
class SyncConfig:
    parity_threshold: float = knob(
        0.0,
        "max |engine lp - trainer lp| on the probe before the run stops; 0 = by the engine dtype (0.05 fp32, 1.5 bf16)",
        ge=0,
    )
    probe_text: str = knob(
        "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer: 3 + 5 = 8.\nFinal: 8",
        "fixed text scored by the engine and the trainer after every push", nonempty=True
    )


@dataclass
class EvalConfig:
    every: int = knob(4, "teacher-trace eval before step 0, every N steps and after the last step (0 = off)", ge=0)
    train_rows: int = knob(8, "training rows evaluated too (the first ones the run trains on), for the _train metrics", ge=0)
    max_trace_tokens: int = knob(256, "length cap of the teacher's greedy traces", ge=1)
    greedy_max_tokens: int = knob(256, "length cap of the student's greedy answers", ge=1)
    greedy_accuracy: bool = knob(True, "decode held-out rows greedily with the run's sampler and score exact match")


@dataclass
class RunConfig:
    steps: int = knob(12, "optimizer steps", ge=1)
    seed: int = knob(0, "seed for data order, sampling and init", ge=0)
    out_dir: str = knob("runs/default", "run directory: metrics.jsonl, config.yaml, checkpoints", nonempty=True)
    save_final: bool = knob(True, "save_pretrained the final student into out_dir/final")
    save_every: int = knob(4, "write a resumable checkpoint every N steps (0 = off)", ge=0)
    keep_checkpoints: int = knob(2, "resumable checkpoints kept, oldest deleted first (0 = all)", ge=0)
    resume: str = knob(
        "",
        "continue the run in this directory from its newest intact checkpoint, with its saved config; flags given "
        "alongside apply from the resumed step on (those that fix the model, the data or the seed are refused)",
    )
    overwrite: bool = knob(False, "start a new run in out_dir even when it holds one (its logs, checkpoints and final model are deleted)")
    verbose: bool = knob(False, "show vLLM's INFO logs")
    device: Literal["auto", "cpu", "cuda"] = knob("auto", "auto (cuda when available), cpu, cuda")
    parallel: Literal["auto", "none", "ddp", "fsdp"] = knob(
        "auto",
        "data parallelism under torchrun: auto (ddp up to run.ddp_max_params student parameters, fsdp above), "
        "ddp (a full replica per rank), fsdp (FSDP2: weights, gradients and optimizer state sharded over the ranks); "
        "a single process always trains the whole model",
    )
    ddp_max_params: int = knob(1_000_000_000, "run.parallel=auto: the largest student, in parameters, trained as DDP replicas", ge=0)
    reshard_after_forward: bool = knob(
        True, "fsdp: free each layer's gathered weights after its forward and gather them again for the backward (false: more memory, fewer all-gathers)"
    )
    wandb: bool = knob(False, "also log to Weights & Biases (needs wandb installed)")
    wandb_project: str = knob("opd-local", "Weights & Biases project, used when run.wandb is on", nonempty=True)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A setting that cannot run; the message names the flag or file and the setting."""


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
            raise ConfigError(f"{where}: {'null' if value is None else repr(value)} is not one of {', '.join(choices)}")
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
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
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
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if typ is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if typ is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: expected {_KINDS.get(typ, typ.__name__)}, got {value!r}")


_KINDS = {int: "an integer", float: "a number", str: "text", bool: "true or false"}
_BOUNDS = (("ge", operator.ge, "at least"), ("gt", operator.gt, "above"), ("le", operator.le, "at most"), ("lt", operator.lt, "below"))


def _check_value(value: Any, f: dataclasses.Field, where: str) -> None:
    if f.metadata.get("nonempty") and not str(value).strip():
        raise ConfigError(f"{where}: must not be empty")
    for key, holds, words in _BOUNDS:
        bound = f.metadata.get(key)
        if bound is not None and not holds(value, bound):
            raise ConfigError(f"{where}: {value!r} must be {words} {bound}")


def _set_field(section: Any, f: dataclasses.Field, value: Any, where: str) -> None:
    value = _coerce(value, _field_type(section, f.name), where)
    _check_value(value, f, where)
    setattr(section, f.name, value)


def resolve_teacher_weights(model_cfg: ModelConfig) -> str:
    """Which weights the teacher runs, with `auto` resolved; contradictory settings are refused."""
    choice, has_teacher, lora = model_cfg.teacher_weights, bool(model_cfg.teacher), model_cfg.lora_rank > 0
    if choice == "auto":
        return "separate" if has_teacher else "base_adapter_off" if lora else "initial"
    if choice == "separate" and not has_teacher:
        raise ConfigError("model.teacher_weights=separate needs model.teacher (a Hugging Face id or directory)")
    if choice in ("initial", "base_adapter_off") and has_teacher:
        raise ConfigError(f"model.teacher_weights={choice} uses the student's weights, but model.teacher is set")
    if choice == "base_adapter_off" and not lora:
        raise ConfigError("model.teacher_weights=base_adapter_off needs a LoRA student (model.lora_rank > 0)")
    if choice not in ("initial", "separate", "base_adapter_off"):
        raise ConfigError(f"model.teacher_weights={choice!r}; choose auto, initial, separate or base_adapter_off")
    return choice


def check_config(cfg: Config) -> Config:
    """Every setting's type, range and choice, then the rules between settings; raises ConfigError.

    parse_config runs it, and so does train(), for configs built in code.
    """
    for section_name, section in _sections(cfg):
        for f in dataclasses.fields(section):
            _set_field(section, f, getattr(section, f.name), f"{section_name}.{f.name}")
    resolve_teacher_weights(cfg.model)
    generation = max(cfg.rollout.max_tokens, cfg.eval.max_trace_tokens, cfg.eval.greedy_max_tokens)
    if cfg.data.max_prompt_tokens + generation > cfg.rollout.max_model_len:
        raise ConfigError(
            f"data.max_prompt_tokens={cfg.data.max_prompt_tokens} plus the longest generation (rollout.max_tokens, "
            f"eval.max_trace_tokens, eval.greedy_max_tokens) = {generation} exceeds rollout.max_model_len={cfg.rollout.max_model_len}"
        )
    if cfg.run.resume and cfg.run.overwrite:
        raise ConfigError("run.overwrite starts a new run and run.resume continues one: give one of them")
    if cfg.run.resume and Path(cfg.run.resume).resolve() != Path(cfg.run.out_dir).resolve():
        raise ConfigError(f"run.out_dir={cfg.run.out_dir!r} differs from run.resume={cfg.run.resume!r}: a resumed run stays in its directory")
    return cfg


def apply_overrides(cfg: Config, overrides: dict[str, dict[str, Any]], source: str) -> Config:
    """Set `overrides[section][key]` on `cfg`, each checked; unknown sections or keys are errors."""
    sections = dict(_sections(cfg))
    if not isinstance(overrides or {}, dict):
        raise ConfigError(f"{source}: must be a mapping of sections, got {type(overrides).__name__}")
    for section_name, values in (overrides or {}).items():
        if section_name not in sections:
            raise ConfigError(f"{source}: unknown config section {section_name!r}; known: {sorted(sections)}")
        section = sections[section_name]
        if not isinstance(values or {}, dict):
            raise ConfigError(f"{source}: section {section_name!r} must be a mapping of keys, got {values!r}")
        fields = {f.name: f for f in dataclasses.fields(section)}
        for key, value in (values or {}).items():
            if key not in fields:
                raise ConfigError(f"{source}: unknown key {section_name}.{key}; known: {sorted(fields)}")
            where = f"--{section_name}.{key}" if source == "command line" else f"{source}: {section_name}.{key}"
            _set_field(section, fields[key], value, where)
    return cfg


# Settings that decide which model trains on which rows in which order: a resume that changed them
# would continue another run from this one's weights and data cursor.
FIXED_ON_RESUME = ("model.", "data.", "run.seed")
CHANGEABLE_ON_RESUME = (
    "model.teacher_placement", "model.teacher_offload_dir", "model.teacher_shared_prefix", "model.attn_implementation",
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
                f"--{key} {new!r} differs from the run's {old!r}: a resume continues the same model, data and seed; "
                "start a new run (another run.out_dir) to change it"
            )
    return changes


def load_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror or err})") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', None) or err})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
    return data


def save_yaml(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print its usage block and exit; one line says it
        raise ConfigError(f"command line: {message} (--help lists every flag)")


def build_arg_parser(description: str) -> argparse.ArgumentParser:
    """A parser with `--config` plus one `--section.key` flag per field (and `--key` where unique)."""
    parser = _Parser(
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file of overrides, by section")
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
                **extra,
            )
    return parser


def parse_config(argv: list[str] | None = None, description: str = "opd-local") -> Config:
    """Defaults, then `--config` YAML, then CLI flags; every setting checked (ConfigError names the bad one).

    With `--resume RUN_DIR` the run's saved config.yaml takes the place of the defaults, so the
    resumed run is the same run; flags given alongside override it, and train() refuses those that
    would make it another run.
    """
    parser = build_arg_parser(description)
    args = vars(parser.parse_args(argv))
    args.pop("debug", None)
    cfg = Config()
    resume = args.get("run.resume")
    if resume:
        saved = Path(resume) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {resume}: no config.yaml there; is it a run directory?")
        apply_overrides(cfg, load_yaml(saved), source=str(saved))
        cfg.run.out_dir = str(resume)
        cfg.run.overwrite = False  # the action that started that run, not part of continuing it
    if "config" in args:
        path = args.pop("config")
        apply_overrides(cfg, load_yaml(path), source=path)
    cli: dict[str, dict[str, Any]] = {}
    for dotted, value in args.items():
        section, key = dotted.split(".", 1)
        cli.setdefault(section, {})[key] = value
    return check_config(apply_overrides(cfg, cli, source="command line"))
