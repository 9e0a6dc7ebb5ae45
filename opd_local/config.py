"""Run configuration: one dataclass tree, the only place defaults live.

Each field is a `knob`: its default, its one-line help and the values it accepts.
`opd_local/config_parsing.py` reads YAML and flags over these defaults and checks the result.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


def knob(default: Any, help: str, *, ge=None, gt=None, le=None, lt=None, nonempty: bool = False):
    """A config field with its one-line help string and, for numbers and text, the values it accepts."""
    metadata = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "nonempty": nonempty}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def choices(section_cls: type, field_name: str) -> tuple:
    """The values a `Literal` field of a config section accepts: its annotation is the one list of them."""
    return typing.get_args(typing.get_type_hints(section_cls)[field_name])


# The seed's users: random.Random (any int), torch.manual_seed (below 2**64), vLLM's engine seed,
# which vllm.utils.torch_utils.set_random_seed passes to numpy.random.seed (below 2**32).
MAX_SEED = 2**32 - 1
# Below it sampling is greedy in effect and the tempered log-probs span 1/T times the logits' range.
MIN_TEMPERATURE = 0.01

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
        "teacher scoring: each privileged prompt runs once with the group's K completions behind it in the packed row "
        "(on its KV cache under flash_attention_2; a sharded teacher always packs every completion with its own copy of "
        "the prompt, and so does a model whose shared-prompt rows failed the start-up packing check)",
    )
    student_shared_prefix: bool = knob(
        True,
        "training forward: a group's K completions follow one copy of the student prompt, each attending to the prompt "
        "and itself (P + K*C tokens instead of K*(P+C)); the same loss and gradients as one copy per completion, "
        "which attn_implementation=flash_attention_2 and a model whose shared-prompt rows failed the start-up packing "
        "check always get",
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
    max_train_rows: int = knob(
        -1,
        "cap on training rows: 0 = all; -1 = auto (8 for bundled:gsm8k, the default job's small set, each row "
        "revisited every 2 steps; all rows of any other source)",
        ge=-1,
    )
    max_heldout_rows: int = knob(16, "cap on held-out rows (0 = all)", ge=0)
    max_prompt_tokens: int = knob(768, "longest allowed prompt; longer rows are refused before step 0, naming the row", ge=1)
    drop_overlong: bool = knob(False, "drop over-long rows and count them instead of refusing the run")
    shuffle: bool = knob(True, "shuffle training rows each epoch (seeded)")


@dataclass
class RolloutConfig:
    sampler: Literal["auto", "vllm", "hf"] = knob("auto", "rollout engine: auto (vllm when installed, else hf), vllm, hf")
    groups_per_step: int = knob(4, "prompt groups per optimizer step (across all ranks)", ge=1)
    samples_per_group: int = knob(4, "completions sampled per prompt (K)", ge=1)
    temperature: float = knob(
        1.0,
        "sampling temperature; rollout_lp and student_lp use it, teacher_lp does not. At least 0.01: the loss divides "
        "the student's logits by it, so its tempered log-probs, the loss and the gradient grow as 1/T times the logit "
        "gaps, while below 0.01 sampling is greedy in effect (a logit gap of 0.1, a bf16 logit's rounding step near "
        "16, already makes a token e^10 times likelier)",
        ge=MIN_TEMPERATURE,
    )
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
        "fkl",
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
    lr: float = knob(1e-4, "AdamW learning rate", gt=0)
    weight_decay: float = knob(0.0, "AdamW weight decay", ge=0)
    beta1: float = knob(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = knob(0.95, "AdamW beta2", ge=0, lt=1)
    eps: float = knob(1e-8, "AdamW epsilon", gt=0)
    warmup_steps: int = knob(0, "linear learning-rate warm-up steps", ge=0)
    grad_clip: float = knob(1.0, "max global gradient norm (0 = off)", ge=0)
    skip_grad_norm: float = knob(
        1e6,
        "skip (and count in optim/skipped) a step whose gradient norm before clipping exceeds this, as one whose loss or "
        "gradient norm is not finite is always skipped; 0 = skip only those",
        ge=0,
    )
    max_skipped_steps: int = knob(3, "stop the run, naming the cause, after this many steps skipped in a row", ge=1)
    micro_batch_tokens: int = knob(
        0,
        "token budget of one packed micro-batch (the tokens of its row: a shared student prompt counts once); "
        "0 = 1024 on CPU and 16384 on CUDA", ge=0
    )


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
    every: int = knob(20, "teacher-trace eval before step 0, every N steps and after the last step (0 = off)", ge=0)
    train_rows: int = knob(8, "training rows evaluated too (the first ones the run trains on), for the _train metrics", ge=0)
    max_trace_tokens: int = knob(256, "length cap of the teacher's greedy traces", ge=1)
    greedy_max_tokens: int = knob(256, "length cap of the student's greedy answers", ge=1)
    greedy_accuracy: bool = knob(True, "decode held-out rows greedily with the run's sampler and score exact match")


@dataclass
class RunConfig:
    steps: int = knob(60, "optimizer steps", ge=1)
    seed: int = knob(
        0,
        "seed for data order, sampling and init; below 2**32, as vLLM passes it to numpy.random.seed (rollouts are "
        "seeded from a 56-bit hash of it, which torch's generators take)",
        ge=0,
        le=MAX_SEED,
    )
    out_dir: str = knob("runs/default", "run directory: metrics.jsonl, config.yaml, checkpoints", nonempty=True)
    save_final: bool = knob(True, "save_pretrained the final student into out_dir/final")
    save_every: int = knob(25, "write a resumable checkpoint every N steps (0 = off)", ge=0)
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
