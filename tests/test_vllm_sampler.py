"""The in-process vLLM engine: rollout logprobs, in-place weight push and the parity probe."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm")

from opd_local.config import Config, ModelConfig  # noqa: E402
from opd_local.models import load_causal_lm  # noqa: E402
from opd_local.packing import pack_sequences  # noqa: E402
from opd_local.scoring import packed_token_logprobs, score_completions  # noqa: E402
from opd_local.sync import StaleWeightsError, parity_probe, push_weights  # noqa: E402

pytestmark = pytest.mark.vllm

# fp32 on both sides, but different kernels (vLLM's CPU attention and GEMMs vs torch sdpa),
# so logprobs agree to about 1e-5; the tolerance leaves room for accumulation order.
LOGPROB_ATOL = 2e-3


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from opd_local.vllm_sampler import VLLMSampler

    cfg = Config()
    cfg.rollout.max_model_len = 512
    sampler = VLLMSampler(tiny_model_dir, cfg, torch.device("cpu"))
    yield sampler
    sampler.close()


@pytest.fixture()
def student(tiny_model_dir):
    return load_causal_lm(tiny_model_dir, ModelConfig(), torch.float32, torch.device("cpu"))


def _prompts(tokenizer):
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)["input_ids"]
        for t in ("What is 7 times 6?", "Write one word.")
    ]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_match_trainer(engine, student, tokenizer, temperature):
    prompts = _prompts(tokenizer)
    groups = engine.generate(prompts, n=3, temperature=temperature, max_tokens=16, seed=123)
    assert len(groups) == len(prompts) and all(len(g) == 3 for g in groups)
    flat_prompts, completions, rollout_lps = [], [], []
    for prompt, group in zip(prompts, groups):
        for completion in group:
            assert 1 <= len(completion.token_ids) <= 16
            assert len(completion.logprobs) == len(completion.token_ids)
            assert all(lp <= 0.0 for lp in completion.logprobs)
            assert completion.finish_reason in ("stop", "length")
            assert (completion.finish_reason == "stop") == (completion.token_ids[-1] == tokenizer.eos_token_id)
            flat_prompts.append(prompt)
            completions.append(completion.token_ids)
            rollout_lps.append(torch.tensor(completion.logprobs))
    trainer_lps = score_completions(student, flat_prompts, completions, micro_batch_tokens=4096, temperature=temperature).logprobs
    for rollout_lp, trainer_lp in zip(rollout_lps, trainer_lps):
        torch.testing.assert_close(rollout_lp, trainer_lp, atol=LOGPROB_ATOL, rtol=0)
    # same seed, same samples: rollouts are reproducible
    again = engine.generate(prompts, n=3, temperature=temperature, max_tokens=16, seed=123)
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in groups]


def test_seeded_batch_larger_than_one_scheduler_step(engine, tokenizer):
    """More prompt tokens than vLLM schedules at once (4096) with per-prompt seeds: must not crash."""
    prompts = [tokenizer(f"Story {i}: " + "once upon a time " * 110)["input_ids"][:450] for i in range(12)]
    groups = engine.generate(prompts, n=2, temperature=1.0, max_tokens=4, seed=7)
    assert sum(len(p) for p in prompts) * 2 > 4096
    assert all(len(c.token_ids) == len(c.logprobs) > 0 for g in groups for c in g)


def test_push_updates_engine_and_skipped_push_is_caught(engine, student, tokenizer):
    probe = tokenizer("Final: 42. The answer is forty-two.")["input_ids"]
    push_weights(engine, student)
    before = torch.tensor(engine.score(probe))
    assert parity_probe(engine, student, probe, threshold=LOGPROB_ATOL)["sync/parity_max_abs"] < LOGPROB_ATOL

    optimizer = torch.optim.SGD(student.parameters(), lr=0.05)
    lp = packed_token_logprobs(student, pack_sequences([probe[:1]], [probe[1:]]))
    (-lp.sum()).backward()  # raise the probe's likelihood: a real, visible update
    optimizer.step()

    with pytest.raises(StaleWeightsError, match="do not match"):
        parity_probe(engine, student, probe, threshold=LOGPROB_ATOL)  # the push was skipped
    push_weights(engine, student)
    after = torch.tensor(engine.score(probe))
    assert parity_probe(engine, student, probe, threshold=LOGPROB_ATOL)["sync/parity_max_abs"] < LOGPROB_ATOL
    assert (after - before).abs().max() > 100 * LOGPROB_ATOL
    assert after.sum() > before.sum()


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_two_step_run_with_vllm(tiny_model_dir, tmp_path, lora_rank):
    """End to end; with LoRA the engine receives merged weights, which the parity probe checks every step."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "scripts/train.py", "--student", tiny_model_dir, "--sampler", "vllm",
        "--steps", "2", "--groups_per_step", "2", "--samples_per_group", "2", "--max_tokens", "12",
        "--max_train_rows", "8", "--max_heldout_rows", "4", "--lr", "1e-3", "--max_model_len", "1024",
        "--eval.every", "0", "--lora_rank", str(lora_rank), "--parity_threshold", str(LOGPROB_ATOL),
        "--out_dir", str(out),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # stdout and stderr interleaved as written
    run = subprocess.run(cmd, check=True, timeout=600, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    # Log hygiene: vLLM at WARNING (no INFO lines), no per-push RotaryEmbedding notice, and each step
    # prints its one line (no progress-bar redraws between them: splitlines also splits at "\r").
    output = run.stdout
    assert "Failed to load weights" not in output and " INFO " not in output, output
    steps = output[output.index("step 0 "):].splitlines()
    assert steps[0].startswith("step 0 rkl=") and steps[1].startswith("step 1 rkl="), output
    for r in records:
        assert r["sync/parity_max_abs"] < Config().sync.parity_threshold
        assert r["rollout/trainer_lp_mismatch"] < LOGPROB_ATOL
        assert r["opd/active_tokens"] > 0
    # The exported model (merged, for LoRA) loads in a fresh vLLM engine and in transformers alike.
    subprocess.run([sys.executable, "-c", EXPORT_CHECK, str(out / "final"), str(LOGPROB_ATOL)], check=True, timeout=300)


EXPORT_CHECK = """
import sys, torch
from opd_local.config import Config, ModelConfig
from opd_local.models import load_causal_lm, load_tokenizer
from opd_local.sync import parity_probe
from opd_local.vllm_sampler import VLLMSampler
path, atol = sys.argv[1], float(sys.argv[2])
cfg = Config(); cfg.rollout.max_model_len = 512
engine = VLLMSampler(path, cfg, torch.device("cpu"))
model = load_causal_lm(path, ModelConfig(), torch.float32, torch.device("cpu"))
probe = load_tokenizer(path, ModelConfig())("Final: 42. The answer is forty-two.")["input_ids"]
print(parity_probe(engine, model, probe, threshold=atol))
"""


def test_vllm_logs_at_warning_unless_verbose(monkeypatch):
    import logging

    from opd_local.vllm_sampler import _configure_environment

    cfg = Config()
    original = logging.getLogger("vllm").level
    try:
        for verbose, level in ((False, logging.WARNING), (True, logging.INFO)):
            monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
            cfg.run.verbose = verbose
            _configure_environment(cfg, torch.device("cpu"))
            assert logging.getLogger("vllm").level == level
    finally:
        logging.getLogger("vllm").setLevel(original)
    rotary = logging.makeLogRecord({"msg": "%s: Failed to load weights", "args": ("RotaryEmbedding",), "levelno": logging.WARNING})
    linear = logging.makeLogRecord({"msg": "%s: Failed to load weights", "args": ("QKVParallelLinear",), "levelno": logging.WARNING})
    reload_logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    assert not reload_logger.filter(rotary) and reload_logger.filter(linear)  # only the harmless one is dropped
