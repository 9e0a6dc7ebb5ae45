"""Run configuration: one dataclass tree, the only place defaults live.

YAML files override the defaults; `--section.key value` (or `--key value` where the
key name is unique across sections) overrides YAML. `--help` lists every knob.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def knob(default: Any, help: str):
    """A config field with its one-line help string."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
BUNDLED_GSM8K = "bundled:gsm8k"


@dataclass
class ModelConfig:
    student: str = knob(EMBEDDED_MODEL, "student: Hugging Face id, local directory, or the embedded SmolLM2")
    teacher: str = knob("", "frozen teacher; empty means the student's starting weights")
    teacher_context: str = knob(
        "privileged", "what the teacher sees: privileged (the worked solution too) or plain (the student's prompt: self-distillation)"
    )
    teacher_weights: str = knob(
        "auto",
        "which weights score: initial (a frozen copy of the student's starting weights), separate (model.teacher, "
        "another model with the same tokenizer), base_adapter_off (LoRA: the student's base with the adapter off, no "
        "second copy), auto (separate when model.teacher is set, else base_adapter_off under LoRA, else initial)",
    )
    teacher_placement: str = knob(
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
    dtype: str = knob(
        "auto",
        "compute dtype: auto (bf16 where the device multiplies in bf16 natively: CUDA, CPUs with AMX-BF16 or "
        "AVX512-BF16; fp32 elsewhere), float32 (fp32) or bfloat16 (bf16); the frozen teacher, the loss inputs and "
        "the rollout engine follow it",
    )
    master_dtype: str = knob(
        "float32",
        "the student's trained weights, gradients and AdamW state: float32, or bfloat16 (half the memory; AdamW "
        "steps below half a bf16 step of a weight are lost)",
    )
    attn_implementation: str = knob("sdpa", "transformers attention backend: sdpa, eager, flash_attention_2")
    cache_dir: str = knob("", "where the embedded model is converted once; empty means ~/.cache/opd-local")
    lora_rank: int = knob(0, "PEFT LoRA rank on the student (0 = train every weight)")
    lora_alpha: float = knob(16.0, "LoRA alpha (the update is scaled by alpha / rank)")
    lora_dropout: float = knob(0.0, "LoRA dropout")
    lora_target_modules: str = knob("all-linear", "comma-separated module names to adapt, or all-linear")


@dataclass
class DataConfig:
    train: str = knob(BUNDLED_GSM8K, "training rows: bundled:gsm8k, a hub id, or a local json/jsonl/parquet path")
    train_split: str = knob("train", "split of `train` to use")
    heldout: str = knob(BUNDLED_GSM8K, "held-out rows (never trained on): same forms as `train`")
    heldout_split: str = knob("test", "split of `heldout` to use")
    format: str = knob("auto", "row format: auto, gsm8k (question/answer), messages (messages/teacher_messages)")
    hub_config: str = knob("main", "dataset config name passed to datasets.load_dataset for hub ids")
    max_train_rows: int = knob(0, "cap on training rows (0 = all)")
    max_heldout_rows: int = knob(16, "cap on held-out rows (0 = all)")
    max_prompt_tokens: int = knob(768, "longest allowed prompt; longer rows are refused before step 0, naming the row")
    drop_overlong: bool = knob(False, "drop over-long rows and count them instead of refusing the run")
    shuffle: bool = knob(True, "shuffle training rows each epoch (seeded)")


@dataclass
class RolloutConfig:
    sampler: str = knob("auto", "rollout engine: auto (vllm when installed, else hf), vllm, hf")
    groups_per_step: int = knob(4, "prompt groups per optimizer step (across all ranks)")
    samples_per_group: int = knob(2, "completions sampled per prompt (K)")
    temperature: float = knob(1.0, "sampling temperature; rollout_lp and student_lp use it, teacher_lp does not")
    max_tokens: int = knob(128, "completion length cap")
    gpu_memory_utilization: float = knob(0.3, "vLLM on GPU: fraction of GPU memory for the engine")
    kv_cache_gib: int = knob(1, "vLLM on CPU: KV-cache size in GiB")
    enforce_eager: str = knob(
        "auto", "vLLM without torch.compile/CUDA graphs: auto (eager on CPU, where compiling costs minutes; graphs on GPU), true, false"
    )
    max_model_len: int = knob(1024, "vLLM context length (prompt + completion)")
    sleep_during_train: bool = knob(True, "vLLM on GPU: free the KV cache while the trainer runs")


@dataclass
class LossConfig:
    objective: str = knob(
        "sampled_rkl",
        "token objective: sampled_rkl (sampled-token reverse KL with IS ratio), full_rkl, topk_rkl, fkl (forward KL), "
        "jsd (generalised JSD); all but sampled_rkl use the full vocabulary from the teacher's hidden states",
    )
    kl_coef: float = knob(1.0, "lambda: scale of the advantage teacher_lp - rollout_lp (of the divergence, for the others)")
    log_ratio_cap: float = knob(2.0, "sampled_rkl: cap on student_lp - rollout_lp inside the importance ratio")
    importance_ratio: bool = knob(
        True, "sampled_rkl: weight tokens by exp(student_lp - rollout_lp); off means ratio = 1 in value"
    )
    normalize: str = knob(
        "token", "token (divide by the step's active tokens) or sequence (mean over completions of per-token means)"
    )
    topk: int = knob(64, "topk_rkl: the student's top-k tokens kept; the rest is one tail bucket")
    jsd_beta: float = knob(0.5, "jsd: beta in M = beta p_teacher + (1 - beta) p_student")
    chunk_tokens: int = knob(1024, "tokens per chunk in the chunked loss (bounds the [chunk, V] fp32 buffer)")


@dataclass
class OptimConfig:
    lr: float = knob(5e-5, "AdamW learning rate")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    beta1: float = knob(0.9, "AdamW beta1")
    beta2: float = knob(0.95, "AdamW beta2")
    eps: float = knob(1e-8, "AdamW epsilon")
    warmup_steps: int = knob(0, "linear learning-rate warm-up steps")
    grad_clip: float = knob(1.0, "max global gradient norm (0 = off)")
    micro_batch_tokens: int = knob(
        0,
        "token budget of one packed micro-batch (prompt + completion); 0 = 1024 on CPU, where the dense "
        "block-diagonal mask grows with the square of the row, and 16384 on CUDA",
    )


def micro_batch_tokens(optim: OptimConfig, device_type: str) -> int:
    if optim.micro_batch_tokens > 0:
        return optim.micro_batch_tokens
    return 16384 if device_type == "cuda" else 1024


@dataclass
class SyncConfig:
    parity_threshold: float = knob(
        0.0, "max |engine lp - trainer lp| on the probe before the run stops; 0 = by the engine dtype (0.05 fp32, 1.5 bf16)"
    )
    probe_text: str = knob(
        "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer: 3 + 5 = 8.\nFinal: 8",
        "fixed text scored by the engine and the trainer after every push",
    )


@dataclass
class EvalConfig:
    every: int = knob(4, "teacher-trace eval before step 0, every N steps and after the last step (0 = off)")
    train_rows: int = knob(8, "training rows evaluated too (the first ones the run trains on), for the _train metrics")
    max_trace_tokens: int = knob(256, "length cap of the teacher's greedy traces")
    greedy_max_tokens: int = knob(256, "length cap of the student's greedy answers")
    greedy_accuracy: bool = knob(True, "decode held-out rows greedily with the run's sampler and score exact match")


@dataclass
class RunConfig:
    steps: int = knob(12, "optimizer steps")
    seed: int = knob(0, "seed for data order, sampling and init")
    out_dir: str = knob("runs/default", "run directory: metrics.jsonl, config.yaml, checkpoints")
    save_final: bool = knob(True, "save_pretrained the final student into out_dir/final")
    save_every: int = knob(4, "write a resumable checkpoint every N steps (0 = off)")
    keep_checkpoints: int = knob(2, "resumable checkpoints kept (oldest deleted first)")
    resume: str = knob("", "continue the run in this directory from its latest checkpoint, with its saved config")
    device: str = knob("auto", "auto (cuda when available), cpu, cuda")
    parallel: str = knob(
        "auto",
        "data parallelism under torchrun: auto (ddp up to run.ddp_max_params student parameters, fsdp above), "
        "ddp (a full replica per rank), fsdp (FSDP2: weights, gradients and optimizer state sharded over the ranks); "
        "a single process always trains the whole model",
    )
    ddp_max_params: int = knob(1_000_000_000, "run.parallel=auto: the largest student, in parameters, trained as DDP replicas")
    reshard_after_forward: bool = knob(
        True, "fsdp: free each layer's gathered weights after its forward and gather them again for the backward (false: more memory, fewer all-gathers)"
    )
    wandb: bool = knob(False, "also log to Weights & Biases (needs wandb installed)")
    wandb_project: str = knob("opd-local", "Weights & Biases project, used when run.wandb is on")


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


def _sections(cfg: Config):
    for section in dataclasses.fields(cfg):
        yield section.name, getattr(cfg, section.name)


def _field_type(section_obj: Any, name: str) -> type:
    hints = typing.get_type_hints(type(section_obj))
    return hints[name]


def _coerce(value: Any, typ: type, where: str) -> Any:
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: expected a boolean, got {value!r}")
    try:
        return typ(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: expected {typ.__name__}, got {value!r}") from err


def apply_overrides(cfg: Config, overrides: dict[str, dict[str, Any]], source: str) -> Config:
    """Set `overrides[section][key]` on `cfg`; unknown sections or keys are errors."""
    sections = dict(_sections(cfg))
    for section_name, values in (overrides or {}).items():
        if section_name not in sections:
            raise ValueError(f"{source}: unknown config section {section_name!r}; known: {sorted(sections)}")
        section = sections[section_name]
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section {section_name!r} must be a mapping")
        known = {f.name for f in dataclasses.fields(section)}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"{source}: unknown key {section_name}.{key}; known: {sorted(known)}")
            where = f"{source}: {section_name}.{key}"
            setattr(section, key, _coerce(value, _field_type(section, key), where))
    return cfg


def load_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a mapping of sections")
    return data


def save_yaml(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def build_arg_parser(description: str) -> argparse.ArgumentParser:
    """A parser with `--config` plus one `--section.key` flag per field (and `--key` where unique)."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file of overrides, by section")
    defaults = Config()
    counts: dict[str, int] = {}
    for _, section in _sections(defaults):
        for f in dataclasses.fields(section):
            counts[f.name] = counts.get(f.name, 0) + 1
    for section_name, section in _sections(defaults):
        group = parser.add_argument_group(section_name)
        for f in dataclasses.fields(section):
            flags = [f"--{section_name}.{f.name}"]
            if counts[f.name] == 1 and f.name != "config":
                flags.append(f"--{f.name}")
            group.add_argument(
                *flags,
                dest=f"{section_name}.{f.name}",
                metavar=type(getattr(section, f.name)).__name__.upper(),
                help=f"{f.metadata['help']} (default: {getattr(section, f.name)!r})",
            )
    return parser


def parse_config(argv: list[str] | None = None, description: str = "opd-local") -> Config:
    """Defaults, then `--config` YAML, then CLI flags.

    With `--resume RUN_DIR` the run's saved config.yaml takes the place of the defaults, so the
    resumed run is the same run; flags given alongside still override it.
    """
    parser = build_arg_parser(description)
    args = vars(parser.parse_args(argv))
    cfg = Config()
    resume = args.get("run.resume")
    if resume:
        saved = Path(resume) / "config.yaml"
        if not saved.exists():
            raise ValueError(f"--resume {resume}: no config.yaml there; is it a run directory?")
        apply_overrides(cfg, load_yaml(saved), source=str(saved))
        cfg.run.out_dir = str(resume)
    if "config" in args:
        apply_overrides(cfg, load_yaml(args.pop("config")), source="config file")
    cli: dict[str, dict[str, Any]] = {}
    for dotted, value in args.items():
        section, key = dotted.split(".", 1)
        cli.setdefault(section, {})[key] = value
    return apply_overrides(cfg, cli, source="command line")
