"""On one CUDA GPU: compiled (not interpreted) kernels against float64, out-of-range targets, packed attention,
a bf16 training step with the HF sampler, FSDP2 on one GPU and parity with a bf16 engine. Skipped without CUDA
(conftest); `scripts/gpu_check.sh` runs them with `pytest -m gpu`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from opd_local.precision import PARITY_THRESHOLDS  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("random_seed")]

CUDA = torch.device("cuda")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compiled():
    from kernels.triton import linear_logprob, logprob

    assert not logprob.INTERPRET, "the Triton kernels run interpreted: TRITON_INTERPRET is set on a GPU machine"
    return logprob, linear_logprob


def _lp64_rows(logits_rows, targets_rows, temperature=1.0):
    return torch.log_softmax(logits_rows.double() / temperature, -1).gather(1, targets_rows[:, None]).squeeze(1)


def test_compiled_logit_kernels_past_int32_offsets_and_the_vocab_tail():
    """N = 65536 rows of V = 151936 bf16 logits (row offsets reach 9.96e9 elements, past 2^31): log-probs,
    their gradient and the fused OPD loss on the first, boundary and last rows, with targets in the last vocab
    block, equal float64."""
    logprob, _ = _compiled()
    n, v, temperature = 65536, 151936, 0.9
    logits = (3.0 * torch.randn(n, v, device=CUDA, dtype=torch.bfloat16)).requires_grad_(True)
    targets = torch.randint(0, v, (n,))
    rows = torch.tensor([0, 1, 2**31 // v - 1, 2**31 // v, 2**31 // v + 1, *range(n - 61, n)])
    targets[rows[::2]] = v - 1 - torch.randint(0, 7, (len(rows[::2]),))  # the vocab tail
    grad_out = torch.randn(n, device=CUDA)
    lp = logprob.token_logprobs(logits, targets, temperature)
    (dlogits,) = torch.autograd.grad(lp, logits, grad_out)
    x = logits.detach()[rows.to(CUDA)]
    t = targets[rows].to(CUDA)
    expect = _lp64_rows(x, t, temperature)
    torch.testing.assert_close(lp[rows.to(CUDA)].double(), expect, atol=1e-4, rtol=0)
    p = torch.softmax(x.double() / temperature, -1)
    onehot = torch.nn.functional.one_hot(t, v).double()
    expect_grad = grad_out[rows.to(CUDA)].double()[:, None] * (onehot - p) / temperature
    got = dlogits[rows.to(CUDA)].double()
    torch.testing.assert_close(got, expect_grad, atol=1e-2 * expect_grad.abs().max().item(), rtol=1e-2)
    del dlogits

    rollout_lp = lp.detach() - 0.1
    teacher_lp = rollout_lp + torch.randn(n, device=CUDA)
    loss, student_lp = logprob.opd_loss(logits, targets, teacher_lp, rollout_lp, normalizer=float(n),
                                        temperature=temperature)
    torch.testing.assert_close(student_lp[rows.to(CUDA)].double(), expect, atol=1e-4, rtol=0)
    expect_loss = -(torch.exp(torch.clamp(lp.detach().double() - rollout_lp.double(), max=2.0))
                    * (teacher_lp.double() - rollout_lp.double())).sum() / n
    torch.testing.assert_close(loss.double(), expect_loss, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v", [(8485, 151936), (8485, 151931), (256, 151936)])
def test_compiled_linear_kernels_equal_float64(dtype, n, v):
    """Autotuned fused-linear kernels (N = 8485 fills 132 SMs), a V that no vocab block divides, and N = 256,
    which runs the chunked cuBLAS path: value, dH and dW against float64 autograd."""
    _, linear_logprob = _compiled()
    h, temperature = 512, 1.1
    hidden = torch.nn.functional.layer_norm(torch.randn(n, h, device=CUDA), (h,)).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, device=CUDA) * 4.0 / h**0.5).to(dtype).requires_grad_(True)
    targets = torch.randint(0, v, (n,))
    targets[:64] = v - 1 - torch.randint(0, 5, (64,))
    grad_out = torch.randn(n, device=CUDA)
    lp = linear_logprob.linear_token_logprobs(hidden, weight, targets, temperature)
    dh, dw = torch.autograd.grad(lp, (hidden, weight), grad_out)
    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    expect = _lp64_rows(h64 @ w64.T, targets.to(CUDA), temperature)
    edh, edw = torch.autograd.grad(expect, (h64, w64), grad_out.double())
    # bf16: exact inputs, but dlogits (and on the chunked path the logits too) are rounded to bf16.
    tol = 2e-5 if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else 3e-2
    torch.testing.assert_close(lp.double(), expect.detach(), atol=1e-4 if dtype == torch.float32 else 5e-2, rtol=0)
    torch.testing.assert_close(dh.double(), edh, atol=tol * edh.abs().max().item(), rtol=tol)
    torch.testing.assert_close(dw.double(), edw, atol=tol * edw.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("objective", ["full_rkl", "fkl", "jsd"])
def test_chunked_divergences_take_fp32_logits_from_cublas(objective):
    """The full-vocabulary objectives run the chunked torch path on CUDA too; bf16 inputs give fp32 logits there."""
    import kernels
    from kernels.torch_ops.common import wide_product
    from oracles import divergence64

    n, vocab, h = 512, 151936, 896
    hidden = torch.nn.functional.layer_norm(torch.randn(n, h, device=CUDA), (h,)).bfloat16().requires_grad_(True)
    weight = (4.0 / h**0.5 * torch.randn(vocab, h, device=CUDA)).bfloat16()
    teacher_hidden = (hidden.detach().float() + 0.3 * torch.randn(n, h, device=CUDA)).bfloat16()
    teacher_weight = (weight.float() + 1.2 / h**0.5 * torch.randn(vocab, h, device=CUDA)).bfloat16()
    targets = torch.randint(0, vocab, (n,), device=CUDA)
    assert wide_product(hidden[:4].detach(), weight.T).dtype == torch.float32

    loss, _, divergence = kernels.linear_divergence_loss(
        hidden, weight, teacher_hidden, teacher_weight, targets, objective=objective, normalizer=float(n)
    )
    (dhidden,) = torch.autograd.grad(loss, (hidden,))
    h64 = hidden.detach().double().requires_grad_(True)
    expect = divergence64(objective, h64 @ weight.double().T, teacher_hidden.double() @ teacher_weight.double().T, k=1, beta=0.5)
    (expect_dh,) = torch.autograd.grad(expect.sum() / n, (h64,))
    # bf16 logits would be off by about 1e-2 of the largest value (tests/test_objectives.py shows it on CPU)
    assert ((divergence.double() - expect).abs().max() / expect.abs().max()).item() < 1e-4
    assert ((dhidden.double() - expect_dh).abs().max() / expect_dh.abs().max()).item() < 1e-2


def test_out_of_range_targets_raise_on_the_host_and_the_context_survives():
    import kernels

    logits = torch.randn(8, 1000, device=CUDA)
    bad = torch.randint(0, 1000, (8,))
    bad[5] = 1000
    with pytest.raises(ValueError, match=r"targets must lie in \[0, V=1000\)"):
        kernels.token_logprobs(logits, bad)
    with torch.no_grad():  # unchecked device targets: a NaN row, no device-side assert
        lp = kernels.token_logprobs(logits, bad.to(CUDA))
    torch.cuda.synchronize()
    assert torch.isnan(lp[5]) and torch.isfinite(lp[torch.arange(8, device=CUDA) != 5]).all()
    assert float((logits @ logits.T).sum()) == float((logits @ logits.T).sum())  # the context still works


@pytest.mark.parametrize("path", ["per_sequence", "flex", "sdpa"])
@pytest.mark.parametrize("autocast", [False, True])
def test_packed_attention_equals_unpacked_on_cuda(tokenizer, tiny_model_dir, monkeypatch, path, autocast):
    from opd_local.config import ModelConfig
    from opd_local.models import load_causal_lm
    from opd_local.hidden_states import final_hidden_states
    from opd_local.packing import pack_sequences

    monkeypatch.setenv("OPD_PACKED_ATTENTION", path)
    model = load_causal_lm(tiny_model_dir, ModelConfig(), torch.float32, CUDA).eval()
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, len(tokenizer), (n,), generator=g).tolist() for n in (300, 2, 77, 640, 129)]
    batch = pack_sequences([s[:1] for s in seqs], [s[1:] for s in seqs]).to(CUDA)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        packed = final_hidden_states(model, batch.input_ids, batch.position_ids)[0].float()
        single = torch.cat([final_hidden_states(model, torch.tensor([s], device=CUDA),
                                                torch.arange(len(s), device=CUDA)[None])[0].float() for s in seqs])
    tol = 5e-2 if autocast else 1e-4
    torch.testing.assert_close(packed, single, atol=tol, rtol=tol)


def test_bf16_training_step_with_the_hf_sampler(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from opd_local.loop import train
    from opd_local.metrics import read_metrics
    from test_loop import tiny_config

    cfg = tiny_config(tiny_model_dir, tmp_path / "run")
    cfg.run.device = "cuda"
    cfg.model.dtype = "bfloat16"
    run_dir = train(cfg)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1]
    for r in records:
        assert r["opd/active_tokens"] > 0 and all(v == v for v in r.values() if isinstance(v, float))
        assert r["sync/parity_max_abs"] <= PARITY_THRESHOLDS[torch.bfloat16]
    before = load_file(f"{tiny_model_dir}/model.safetensors")
    after = load_file(f"{run_dir}/final/model.safetensors")
    assert any(not torch.equal(before[k].float(), after[k].float()) for k in before)


def test_parity_probe_against_a_bf16_engine(tiny_model_dir, tokenizer, monkeypatch):
    """The HF engine holds bf16 weights on CUDA: after a push, engine and trainer (bf16 autocast over fp32
    masters) agree within the bf16 threshold, and a push that never arrives after one AdamW step at the
    default learning rate is caught."""
    from opd_local.config import Config, ModelConfig
    from opd_local.optimizer import build_optimizer
    from opd_local.models import load_causal_lm
    from opd_local.packing import pack_sequences
    from opd_local.precision import resolve_precision
    from opd_local.samplers.hf import HFSampler
    from opd_local.scoring import packed_token_logprobs
    from opd_local.sync import StaleWeightsError, WeightSync

    cfg = Config()
    policy = resolve_precision("bfloat16", CUDA)
    student = load_causal_lm(tiny_model_dir, ModelConfig(), policy.master, CUDA)
    engine = HFSampler.load(tiny_model_dir, ModelConfig(), CUDA, tokenizer.eos_token_id, tokenizer.pad_token_id, policy.engine)
    probe = tokenizer(cfg.sync.probe_text)["input_ids"]
    weight_sync = WeightSync(probe, policy.parity_threshold(0.0), policy.compute)
    assert weight_sync.push_and_check(engine, student)["sync/parity_max_abs"] <= PARITY_THRESHOLDS[torch.bfloat16]
    optimizer, _ = build_optimizer(student, cfg.optim)
    with policy.autocast():
        lp = packed_token_logprobs(student, pack_sequences([probe[:1]], [probe[1:]]).to(CUDA), compute_dtype=policy.compute)
    (-lp.sum()).backward()
    optimizer.step()
    with monkeypatch.context() as patch:
        patch.setattr(engine, "push_weights", lambda named_tensors: [None for _ in named_tensors])
        with pytest.raises(StaleWeightsError):
            weight_sync.push_and_check(engine, student)
    assert weight_sync.push_and_check(engine, student)["sync/parity_max_abs"] <= PARITY_THRESHOLDS[torch.bfloat16]


_FSDP_ONE_GPU = textwrap.dedent(
    """
    import copy, os, sys
    import torch, torch.distributed as dist
    sys.path[:0] = [sys.argv[2], os.path.join(sys.argv[2], "tests")]
    from opd_local import distributed
    from opd_local.config import Config, ModelConfig
    from opd_local.training import accumulate_gradients
    from opd_local.models import load_causal_lm, load_tokenizer
    from opd_local.precision import resolve_precision
    from test_loop import _rollouts

    torch.manual_seed(0)
    dist.init_process_group("cpu:gloo,cuda:nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    device = torch.device("cuda", 0)
    tokenizer = load_tokenizer(os.path.join(sys.argv[2], "tests", "assets", "smollm2-135m-instruct"), ModelConfig())
    base = load_causal_lm(sys.argv[1], ModelConfig(), torch.float32, torch.device("cpu"))
    rollouts = _rollouts(base, tokenizer, teacher_shift=0.5)
    cfg = Config()
    policy = resolve_precision("bfloat16", device)
    grads = {}
    for layout in ("none", "fsdp"):
        student = distributed.wrap_student(copy.deepcopy(base), layout, device, compute_dtype=policy.compute)
        stats = accumulate_gradients(student, rollouts, cfg, policy, 16384).reduced()
        assert stats["opd/loss"] == stats["opd/loss"], stats
        grads[layout] = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float()
                         for n, p in student.module.named_parameters()}
    for name, g in grads["none"].items():
        f = grads["fsdp"][name]
        cos = torch.nn.functional.cosine_similarity(g.flatten(), f.flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))
        assert abs(float(f.norm() / g.norm()) - 1) < 0.05, (name, float(f.norm()), float(g.norm()))
    dist.destroy_process_group()
    print("OK")
    """
)


def test_fsdp2_on_one_gpu_matches_the_plain_model(tiny_model_dir):
    """FSDP2 (bf16 gathers over fp32 shards, fp32 reduction) over a 1-rank NCCL group: the same gradients as the
    unwrapped model under bf16 autocast, to bf16 rounding."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    proc = subprocess.run([sys.executable, "-c", _FSDP_ONE_GPU, tiny_model_dir, ROOT], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-3000:] + proc.stderr[-5000:]


# --- Qwen 3.5's Gated DeltaNet on packed rows, on whichever implementation transformers picked -------------


def _gdn_implementations() -> dict[str, str]:
    """What transformers' Qwen 3.5 runs for its token mixers: `use_kernel_func_from_hub_with_fallback` picks, once
    at import, flash-linear-attention's (`fla`) or causal-conv1d's function when the package imports, else its
    own torch code, and keeps the choice in the wrapper's closure as `implementation`."""
    import importlib.util

    from transformers.models.qwen3_5 import modeling_qwen3_5

    found = {}
    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn"):
        fn, implementation = getattr(modeling_qwen3_5, name), None
        while fn is not None and implementation is None:  # through any hub-kernel wrapper around it
            code = getattr(fn, "__code__", None)
            if code is not None and "implementation" in code.co_freevars:
                implementation = fn.__closure__[code.co_freevars.index("implementation")].cell_contents
            fn = getattr(fn, "__wrapped__", None)
        found[name] = f"{implementation.__module__}.{implementation.__qualname__}" if implementation else "?"
    for package in ("fla", "causal_conv1d"):
        found[package] = "importable" if importlib.util.find_spec(package) is not None else "absent"
    if found["fla"] == "importable":
        try:
            import fla

            found["fla"] = f"importable, version {getattr(fla, '__version__', '?')}"
            importlib.import_module("fla.ops.gated_delta_rule")
        except Exception as exc:  # transformers swallows this and falls back: say why
            found["fla"] += f", but fla.ops.gated_delta_rule fails to import: {type(exc).__name__}: {exc}"
    return found


def _qwen3_5_probe(vocab_size: int):
    """Two prompts and five completions of random tokens: sequences of 77, 71, 160, 64 and 153 tokens, so the
    chunked delta rule (64-token chunks) runs one to three chunks per sequence, and a shared prompt's
    completion replays 70 or 23 prompt tokens before its own."""
    g = torch.Generator().manual_seed(5)

    def tokens(n):
        return torch.randint(0, vocab_size, (n,), generator=g).tolist()

    prompts = [tokens(70), tokens(23)]
    completions = [[tokens(n) for n in (7, 1, 90)], [tokens(n) for n in (41, 130)]]
    return prompts, completions


def _assert_qwen3_5_packs_exactly(model_dir: str, device: torch.device, tokenizer, label: str) -> None:
    from opd_local.config import ModelConfig
    from opd_local.models import decoder_layers, load_causal_lm
    from opd_local.packing import PackingPlan, pack_groups
    from opd_local.packing_check import check_packing
    from opd_local.scoring import packed_token_logprobs, score_completions
    from opd_local.token_mixers import token_mixer_types

    model = load_causal_lm(model_dir, ModelConfig(), torch.float32, device)
    mixers = token_mixer_types(decoder_layers(model))
    assert mixers == ["Qwen3_5GatedDeltaNet"], mixers
    prompts, completions = _qwen3_5_probe(len(tokenizer))
    pairs = [(p, c) for p, cs in zip(prompts, completions) for c in cs]
    expected = []
    for p, c in pairs:  # each sequence alone through the model's own transformers forward
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c], device=device)).logits[0].double()
        positions = torch.arange(len(p) - 1, len(p) + len(c) - 1, device=device)
        expected.append(torch.log_softmax(logits, -1)[positions, torch.tensor(c, device=device)].cpu())
    for shared in (False, True):
        scores = score_completions(model, [p for p, _ in pairs], [c for _, c in pairs], micro_batch_tokens=100_000,
                                   shared_prefix=shared)
        for got, want in zip(scores.logprobs, expected):
            torch.testing.assert_close(got.double().cpu(), want, atol=1e-4, rtol=0,
                                       msg=lambda m: f"shared_prefix={shared}: {m}")
    with torch.enable_grad():  # the student's training row
        row = packed_token_logprobs(model, pack_groups(list(zip(prompts, completions))).to(device))
    torch.testing.assert_close(row.detach().double().cpu(), torch.cat(expected), atol=1e-4, rtol=0)

    for compute_dtype in (torch.float32, torch.bfloat16):
        check = check_packing(model, compute_dtype=compute_dtype, shared_prompt=True, vocab_size=len(tokenizer),
                              differentiated=True)
        print(check.describe(label, token_mixer_types(decoder_layers(model))))
        assert check.plan == PackingPlan(packed=True, shared_prompt=True), check.describe(label, [])
        assert max(check.leaks.values()) == 0.0, check.describe(label, [])


@pytest.fixture(scope="module")
def qwen3_5_dirs(tmp_path_factory, tokenizer):
    from model_families import save_tiny_family

    return {name: save_tiny_family(name, tmp_path_factory.mktemp(name), tokenizer, seed=0)
            for name in ("qwen3_5", "qwen3_5_hub")}


@pytest.mark.parametrize("layout", ["qwen3_5", "qwen3_5_hub"])
def test_qwen3_5_gated_deltanet_packs_exactly_on_cuda(layout, qwen3_5_dirs, tokenizer, monkeypatch):
    """Tiny Qwen 3.5 (3 Gated DeltaNet layers + 1 attention) in float32 on CUDA, through whichever delta-rule code
    transformers picked at import (flash-linear-attention's Triton kernels when `fla` imports, else its torch
    fallback; printed: `-s` or -rA shows it): packed rows, with and without a shared prompt, and the training row
    equal each sequence alone through the model's own forward to 1e-4, and the start-up check keeps both layouts
    with no leak in float32 and under bf16 autocast. `scripts/gpu_check.sh` runs it in its `fla` step.

    The attention layer takes the per-sequence path: flex's compiles (fp32, bf16, with autograd) would take most
    of the step's time, and test_packed_attention_equals_unpacked_on_cuda covers every path."""
    implementations = _gdn_implementations()
    print(f"Gated DeltaNet implementation ({layout}): " + "; ".join(f"{k}: {v}" for k, v in implementations.items()),
          flush=True)
    if implementations["fla"].startswith("importable"):  # fla is there: the test is about its kernels, not the fallback
        assert implementations["torch_chunk_gated_delta_rule"].startswith("fla."), implementations
    monkeypatch.setenv("OPD_PACKED_ATTENTION", "per_sequence")
    _assert_qwen3_5_packs_exactly(qwen3_5_dirs[layout], CUDA, tokenizer, layout)
