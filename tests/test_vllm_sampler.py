"""The in-process vLLM engine: rollout logprobs, in-place weight push and the parity probe."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm")

from opd_local import distributed  # noqa: E402
from opd_local.config import Config, ModelConfig  # noqa: E402
from opd_local.models import load_causal_lm, load_student  # noqa: E402
from opd_local.packing import pack_sequences  # noqa: E402
from opd_local.optimizer import build_optimizer  # noqa: E402
from opd_local.precision import PARITY_THRESHOLDS, multiplies_in_bf16, resolve_precision  # noqa: E402
from opd_local.samplers import rollout_seeds  # noqa: E402
from opd_local.samplers.hf import HFSampler  # noqa: E402
from opd_local.scoring import packed_token_logprobs, score_completions  # noqa: E402
from opd_local.sync import StaleWeightsError, WeightSync, parity_probe, push_model_weights  # noqa: E402

pytestmark = pytest.mark.vllm

# fp32 on both sides, but different kernels (vLLM's CPU attention and GEMMs vs torch sdpa),
# so logprobs agree to about 1e-5; the tolerance leaves room for accumulation order.
LOGPROB_ATOL = 2e-3


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from opd_local.samplers.vllm import VLLMSampler

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


@pytest.mark.parametrize("kind", ["vllm", "hf"])
def test_every_sample_of_a_step_draws_from_its_own_stream(engine, tiny_model_dir, tokenizer, kind):
    """Every group of the step holds the same prompt, so two samples that shared a random stream
    would be the same completion (vLLM draws sample j from stream seed + j: consecutive group
    seeds did that). The seeds are those of the step's global batch, whatever the rank count."""
    groups, n = 4, 3
    seeds = rollout_seeds(0, 5, groups, n)
    for world_size in (1, 2, 3):
        ranks = [distributed.DistContext(r, world_size, r, torch.device("cpu")) for r in range(world_size)]
        by_group = {g: s for ctx in ranks for g, s in zip(distributed.shard_for_rank(range(groups), ctx), distributed.shard_for_rank(seeds, ctx))}
        assert [by_group[g] for g in range(groups)] == seeds
    streams = {s + j for step in range(3) for s in rollout_seeds(0, step, groups, n) for j in range(n)}
    assert len(streams) == 3 * groups * n
    if kind == "vllm":
        sampler = engine
    else:
        sampler = HFSampler.load(tiny_model_dir, ModelConfig(), torch.device("cpu"), tokenizer.eos_token_id, tokenizer.pad_token_id)
    prompt = _prompts(tokenizer)[1]
    completions = sampler.generate([prompt] * groups, n=n, temperature=1.0, max_tokens=12, seed=seeds)
    samples = [tuple(c.token_ids) for group in completions for c in group]
    assert len(set(samples)) == groups * n


def test_a_vllm_whose_reload_weights_differs_is_refused(engine):
    from opd_local.samplers.vllm_startup import runner_reload_weights, check_reload_signature

    (runner_reload,) = engine.llm.collective_rpc(runner_reload_weights)
    check_reload_signature(runner_reload)  # the installed vLLM, as the engine checked when it was built

    def before_in_place_reload(self, weights_path=None):
        pass

    for reload in (before_in_place_reload, None):
        with pytest.raises(RuntimeError, match=r"reload_weights takes no weights_iterator, is_checkpoint_format.*vllm==0.32.0"):
            check_reload_signature(reload)


def test_seeded_batch_larger_than_one_scheduler_step(engine, tokenizer):
    """More prompt tokens than vLLM schedules at once (4096) with per-prompt seeds: must not crash."""
    prompts = [tokenizer(f"Story {i}: " + "once upon a time " * 110)["input_ids"][:450] for i in range(12)]
    groups = engine.generate(prompts, n=2, temperature=1.0, max_tokens=4, seed=7)
    assert sum(len(p) for p in prompts) * 2 > 4096
    assert all(len(c.token_ids) == len(c.logprobs) > 0 for g in groups for c in g)


def test_push_updates_engine_and_skipped_push_is_caught(engine, student, tokenizer):
    probe = tokenizer("Final: 42. The answer is forty-two.")["input_ids"]
    push_model_weights(engine, student)
    before = torch.tensor(engine.score(probe))
    assert parity_probe(engine, student, probe, threshold=LOGPROB_ATOL)["sync/parity_max_abs"] < LOGPROB_ATOL

    optimizer = torch.optim.SGD(student.parameters(), lr=0.05)
    lp = packed_token_logprobs(student, pack_sequences([probe[:1]], [probe[1:]]))
    (-lp.sum()).backward()  # raise the probe's likelihood: a real, visible update
    optimizer.step()

    with pytest.raises(StaleWeightsError, match="do not match"):
        parity_probe(engine, student, probe, threshold=LOGPROB_ATOL)  # the push was skipped
    push_model_weights(engine, student)
    after = torch.tensor(engine.score(probe))
    assert parity_probe(engine, student, probe, threshold=LOGPROB_ATOL)["sync/parity_max_abs"] < LOGPROB_ATOL
    assert (after - before).abs().max() > 100 * LOGPROB_ATOL
    assert after.sum() > before.sum()


def test_an_engine_on_the_transformers_backend_leaves_transformers_classes_alone(tokenizer, family_dir):
    """vLLM serves olmo2 through its transformers backend, which marks `Olmo2Model` for torch.compile in place
    (bases, __init__, __call__...). The engine is built first (loop.train), then the trainer's models: they must
    build from the untouched class and compute what plain transformers computes, while the engine keeps its
    patched instances, gives the same outputs as before and still takes a weight push."""
    from transformers.models.olmo2.modeling_olmo2 import Olmo2Model
    from vllm.compilation.wrapper import TorchCompileWithNoGuardsWrapper

    from opd_local.samplers.vllm import VLLMSampler

    path, model_cfg = family_dir("olmo2"), ModelConfig()
    probe = tokenizer("Final: 42. The answer is forty-two.")["input_ids"]
    prompt = _prompts(tokenizer)[0]
    with torch.no_grad():  # built before any engine: plain transformers
        clean_logits = load_causal_lm(path, model_cfg, torch.float32, torch.device("cpu"))(torch.tensor([probe])).logits
    bases, attributes = Olmo2Model.__bases__, dict(vars(Olmo2Model))

    cfg = Config()
    cfg.rollout.max_model_len = 512
    engine = VLLMSampler(path, cfg, torch.device("cpu"))
    try:
        assert Olmo2Model.__bases__ == bases and all(vars(Olmo2Model).get(k) is v for k, v in attributes.items())
        assert vars(Olmo2Model).keys() - attributes.keys() <= {"_can_set_experts_implementation_cached_value"}  # transformers' own
        (engine_class,) = engine.llm.apply_model(lambda model: type(model.model))
        assert engine_class.__mro__[1] is Olmo2Model and issubclass(engine_class, TorchCompileWithNoGuardsWrapper)
        assert engine_class.__call__ is not torch.nn.Module.__call__  # vLLM's dispatch to its compiled graph
        greedy = engine.generate([prompt], n=1, temperature=0.0, max_tokens=8, seed=0)
        scores = engine.score(probe)

        student = load_student(path, model_cfg, torch.float32, seed=0)
        assert type(student.model) is Olmo2Model and TorchCompileWithNoGuardsWrapper not in Olmo2Model.__mro__
        assert Olmo2Model.__init__ is attributes["__init__"] and Olmo2Model.__call__ is torch.nn.Module.__call__
        with torch.no_grad():
            assert torch.equal(student(torch.tensor([probe])).logits, clean_logits)

        assert engine.generate([prompt], n=1, temperature=0.0, max_tokens=8, seed=0)[0][0].token_ids == greedy[0][0].token_ids
        assert engine.score(probe) == scores
        assert parity_probe(engine, student, probe, threshold=LOGPROB_ATOL)["sync/parity_max_abs"] < LOGPROB_ATOL
        push_model_weights(engine, student)  # vLLM's in-place reload into the engine's own instances
        assert parity_probe(engine, student, probe, threshold=LOGPROB_ATOL)["sync/parity_max_abs"] < LOGPROB_ATOL
    finally:
        engine.close()


@pytest.mark.skipif(not multiplies_in_bf16(torch.device("cpu")), reason="vLLM's CPU Gated DeltaNet computes in bf16")
def test_qwen3_5_hub_checkpoint_serves_seeded_rollouts(family_dir, tokenizer):
    """vLLM's Qwen 3.5 module imports torchvision; its recurrent state is not prefix-cached, so no seeded prefill
    is split over scheduler steps (which crashes vLLM's CPU sampler), even in a batch larger than one step."""
    from opd_local.samplers.vllm import VLLMSampler

    cfg = Config()
    cfg.rollout.max_model_len = 512
    engine = VLLMSampler(family_dir("qwen3_5_hub"), cfg, torch.device("cpu"), torch.bfloat16)
    try:
        cache = engine.llm.llm_engine.vllm_config.cache_config
        assert (cache.enable_prefix_caching, cache.mamba_cache_mode) == (False, "none")
        prompts = [tokenizer(f"Story {i}: " + "once upon a time " * 110)["input_ids"][:450] for i in range(6)]
        assert sum(len(p) for p in prompts) * 2 > 4096
        runs = [engine.generate(prompts, n=2, temperature=1.0, max_tokens=4, seed=seed) for seed in (7, 7, 8)]
        tokens = [[[c.token_ids for c in group] for group in groups] for groups in runs]
        assert tokens[0] == tokens[1] != tokens[2]
        assert all(len(c.token_ids) == len(c.logprobs) == 4 for g in runs[0] for c in g)
        assert all(math.isfinite(lp) for g in runs[0] for c in g for lp in c.logprobs)
    finally:
        engine.close()


def test_fp32_gated_deltanet_is_refused_before_the_engine_is_built(family_dir, monkeypatch):
    import vllm

    from opd_local.samplers.vllm import VLLMSampler

    def build(**kwargs):
        raise AssertionError("the engine was built")

    monkeypatch.setattr(vllm, "LLM", build)
    with pytest.raises(RuntimeError, match=r"Gated DeltaNet \(Qwen3_5ForConditionalGeneration\) computes in bfloat16 only"):
        VLLMSampler(family_dir("qwen3_5_hub"), Config(), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def bf16_engine(tiny_model_dir):
    from opd_local.samplers.vllm import VLLMSampler

    cfg = Config()
    cfg.rollout.max_model_len = 512
    sampler = VLLMSampler(tiny_model_dir, cfg, torch.device("cpu"), torch.bfloat16)
    yield sampler
    sampler.close()


def test_bf16_push_passes_and_a_push_that_never_arrives_fails(bf16_engine, tiny_model_dir, tokenizer, monkeypatch):
    """With a bf16 engine, the probe's bf16 rounding is as large as one step's change at the default
    learning rate, so the absolute threshold cannot see a skipped push; the movement check must."""
    policy = resolve_precision("bfloat16", torch.device("cpu"))
    student = load_causal_lm(tiny_model_dir, ModelConfig(), policy.master, torch.device("cpu"))
    probe = tokenizer(Config().sync.probe_text)["input_ids"]
    weight_sync = WeightSync(probe, policy.parity_threshold(0.0), policy.compute)
    assert weight_sync.push_and_check(bf16_engine, student)["sync/parity_max_abs"] < PARITY_THRESHOLDS[torch.bfloat16]
    before = torch.tensor(bf16_engine.score(probe))

    cfg = Config()
    cfg.optim.lr = 5e-5  # one AdamW step small enough to stay under the bf16 threshold: only the movement check sees it
    optimizer, _ = build_optimizer(student, cfg.optim)
    batch = pack_sequences([probe[:1]], [probe[1:]])
    with policy.autocast():
        lp = packed_token_logprobs(student, batch, compute_dtype=policy.compute)
    (-lp.sum()).backward()
    optimizer.step()

    with monkeypatch.context() as patch:  # a push that reads every tensor but loads none of them
        patch.setattr(bf16_engine, "push_weights", lambda named_tensors: [None for _ in named_tensors])
        with pytest.raises(StaleWeightsError, match="did not change"):
            weight_sync.push_and_check(bf16_engine, student)
    metrics = weight_sync.push_and_check(bf16_engine, student)  # the real push
    assert metrics["sync/parity_max_abs"] < PARITY_THRESHOLDS[torch.bfloat16]
    assert not torch.equal(torch.tensor(bf16_engine.score(probe)), before)


def test_same_bf16_weights_pushed_again_pass(bf16_engine, tiny_model_dir, tokenizer):
    """An update that rounds away in bf16 (a young LoRA adapter, a skipped optimizer step) leaves the
    engine's weights bit for bit the same: not a stale push."""
    policy = resolve_precision("bfloat16", torch.device("cpu"))
    student = load_causal_lm(tiny_model_dir, ModelConfig(), policy.master, torch.device("cpu"))
    weight_sync = WeightSync(tokenizer(Config().sync.probe_text)["input_ids"], policy.parity_threshold(0.0), policy.compute)
    with torch.no_grad():
        for param in student.parameters():
            param.copy_(param.to(torch.bfloat16))  # fp32 masters that bf16 represents exactly
    weight_sync.push_and_check(bf16_engine, student)
    with torch.no_grad():  # far below half a bf16 step (2^-9 relative): rounds back to the same bf16 weights
        for param in student.parameters():
            param.add_(param.abs() * 1e-4)
    # The trainer's probe scores move with the fp32 update; the engine's cannot, and must not have to.
    weight_sync.push_and_check(bf16_engine, student)


@pytest.mark.parametrize("lora_rank, dtype", [(4, "bfloat16")])
def test_two_step_run_with_vllm(tiny_model_dir, tmp_path, lora_rank, dtype):
    """End to end through the command line; with LoRA the engine receives merged weights, which the parity
    probe checks every step. bf16 (a bf16 engine, bf16 autocast over fp32 masters) runs at its dtype's default
    threshold, and a young LoRA adapter whose merged update rounds away in bf16 must not be mistaken for a
    skipped push. (One vLLM step per family and precision: tests/test_model_families.py; merged LoRA weights
    against the engine in fp32: tests/test_lora.py; a two-step fp32 run: the torchrun test below.)
    """
    out = tmp_path / "run"
    threshold = LOGPROB_ATOL if dtype == "float32" else PARITY_THRESHOLDS[torch.bfloat16]
    cmd = [
        sys.executable, "scripts/train.py", "--student", tiny_model_dir, "--sampler", "vllm",
        "--steps", "2", "--groups_per_step", "2", "--samples_per_group", "2", "--max_tokens", "12",
        "--max_train_rows", "8", "--max_heldout_rows", "4", "--lr", "1e-3", "--max_model_len", "1024",
        "--eval.every", "0", "--lora_rank", str(lora_rank), "--dtype", dtype,
        *(["--parity_threshold", str(LOGPROB_ATOL)] if dtype == "float32" else []),
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
        assert r["sync/parity_max_abs"] < threshold
        # bf16: both engines round their logits to bf16 (measured mean 0.037 on SmolLM2's larger logits)
        assert r["rollout/trainer_lp_mismatch"] < (LOGPROB_ATOL if dtype == "float32" else 0.05)
        assert r["opd/active_tokens"] > 0
    # The exported model (merged, for LoRA) loads in a fresh vLLM engine and in transformers alike.
    subprocess.run([sys.executable, "-c", EXPORT_CHECK, str(out / "final"), str(LOGPROB_ATOL)], check=True, timeout=300)


EXPORT_CHECK = """
import sys, torch
from opd_local.config import Config, ModelConfig
from opd_local.models import load_causal_lm, load_tokenizer
from opd_local.sync import parity_probe
from opd_local.samplers.vllm import VLLMSampler
path, atol = sys.argv[1], float(sys.argv[2])
cfg = Config(); cfg.rollout.max_model_len = 512
engine = VLLMSampler(path, cfg, torch.device("cpu"))
model = load_causal_lm(path, ModelConfig(), torch.float32, torch.device("cpu"))
probe = load_tokenizer(path, ModelConfig())("Final: 42. The answer is forty-two.")["input_ids"]
print(parity_probe(engine, model, probe, threshold=atol))
"""


TORCHRUN_ENGINE_CHECK = """
import sys, torch
from opd_local import distributed
from opd_local.config import Config
from opd_local.samplers.vllm import VLLMSampler
ctx = distributed.init_distributed("cpu")
cfg = Config(); cfg.rollout.max_model_len = 512
engine = VLLMSampler(sys.argv[1], cfg, ctx.device)
(placement,) = engine.llm.collective_rpc(lambda worker: (worker.rank, worker.local_rank, str(worker.device)))
# On a GPU box the device is cuda:LOCAL_RANK; under the uniprocess executor every rank got rank 0, local rank 0.
assert placement == (ctx.rank, ctx.local_rank, str(ctx.device)), (placement, ctx)
assert len(engine.generate([[1, 2, 3]], n=2, temperature=1.0, max_tokens=4, seed=ctx.rank)[0]) == 2
"""


def _vllm_run(tiny_model_dir, out, nproc):
    args = [
        "scripts/train.py", "--student", tiny_model_dir, "--sampler", "vllm", "--steps", "2", "--groups_per_step", "4",
        "--samples_per_group", "2", "--max_tokens", "10", "--max_train_rows", "16", "--max_heldout_rows", "2",
        "--max_model_len", "1024", "--eval.every", "0", "--save_final", "false", "--out_dir", str(out),
        "--dtype", "float32",  # ranks compared to fp32 rounding, the engine to the trainer at LOGPROB_ATOL
    ]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    subprocess.run(launcher + args, check=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_gives_each_rank_its_own_engine(tiny_model_dir, tmp_path):
    """Under torchrun every rank's engine joins the trainer's group as rank RANK on LOCAL_RANK's device
    (vLLM's external_launcher), and a 2-rank run samples and trains exactly as one rank does."""
    script = tmp_path / "engine_check.py"
    script.write_text(TORCHRUN_ENGINE_CHECK)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    subprocess.run(launcher + [str(script), tiny_model_dir], check=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})

    one, two = _vllm_run(tiny_model_dir, tmp_path / "one", 1), _vllm_run(tiny_model_dir, tmp_path / "two", 2)
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 1]
    for a, b in zip(one, two):
        assert a["opd/active_tokens"] == b["opd/active_tokens"] and b["groups/sampled"] == 4
        for key in ("opd/sampled_reverse_kl", "opd/loss"):
            assert abs(a[key] - b[key]) < 1e-5, key
        assert b["sync/parity_max_abs"] < LOGPROB_ATOL


def test_vllm_logs_at_warning_unless_verbose(monkeypatch):
    import logging

    from opd_local.samplers.vllm_startup import configure_environment

    cfg = Config()
    original = logging.getLogger("vllm").level
    try:
        for verbose, level in ((False, logging.WARNING), (True, logging.INFO)):
            monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
            cfg.run.verbose = verbose
            configure_environment(cfg, torch.device("cpu"))
            assert logging.getLogger("vllm").level == level
    finally:
        logging.getLogger("vllm").setLevel(original)
    rotary = logging.makeLogRecord({"msg": "%s: Failed to load weights", "args": ("RotaryEmbedding",), "levelno": logging.WARNING})
    linear = logging.makeLogRecord({"msg": "%s: Failed to load weights", "args": ("QKVParallelLinear",), "levelno": logging.WARNING})
    reload_logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    assert not reload_logger.filter(rotary) and reload_logger.filter(linear)  # only the harmless one is dropped
