"""`attention.run_attention`, one run's attention: the explicit-matmul form the CPU trains with against
SDPA and a float64 reference, in values and in gradients, and when it is chosen."""

import pytest
import torch

from opd_local import attention


def _inputs(prefix: int, run: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, run, 16, generator=g, dtype=torch.float64) * 2
    k = torch.randn(2, 3, prefix + run, 16, generator=g, dtype=torch.float64) * 2
    v = torch.randn(2, 3, prefix + run, 16, generator=g, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _value_and_grads(inputs, grad_out, **kwargs):
    out = attention.run_attention(*inputs, **kwargs)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return [out.detach(), *grads]


@pytest.mark.parametrize("prefix,run", [(0, 1), (0, 13), (7, 1), (9, 12)])
def test_matmul_form_equals_sdpa_in_float64(prefix, run):
    inputs = _inputs(prefix, run, torch.float64)
    grad_out = torch.randn_like(inputs[0])
    by_matmul = _value_and_grads(inputs, grad_out, matmul=True)
    by_sdpa = _value_and_grads(inputs, grad_out, matmul=False)
    for a, b in zip(by_matmul, by_sdpa):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_matmul_form_is_causal_after_the_prefix():
    """Changing a key or value after a query's position leaves its output alone; the prefix it always sees."""
    q, k, v = (t.detach() for t in _inputs(5, 6, torch.float64))
    out = attention.run_attention(q, k, v, matmul=True)
    later_k, later_v = k.clone(), v.clone()
    later_k[:, :, 5 + 3 :] += 1.0
    later_v[:, :, 5 + 3 :] -= 2.0
    changed = attention.run_attention(q, later_k, later_v, matmul=True)
    torch.testing.assert_close(changed[:, :, :3], out[:, :, :3], atol=0, rtol=0)  # queries 0-2 see keys < 5 + 3
    assert (changed[:, :, 3:] - out[:, :, 3:]).abs().max() > 1e-3


@pytest.mark.parametrize("prefix,run", [(0, 40), (30, 25)])
def test_matmul_form_in_bf16_is_as_close_to_float64_as_sdpa(prefix, run):
    """bf16 inputs: the matmul form's values and gradients sit as near the float64 result as SDPA's do."""
    grad_out = torch.randn(2, 3, run, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reference = _value_and_grads(_inputs(prefix, run, torch.float64), grad_out)
    errors = {}
    for matmul in (True, False):
        got = _value_and_grads(_inputs(prefix, run, torch.bfloat16), grad_out.bfloat16(), matmul=matmul)
        errors[matmul] = [float((g.double() - r).abs().max() / r.abs().max()) for g, r in zip(got, reference)]
    for name, by_matmul, by_sdpa in zip(("out", "dq", "dk", "dv"), errors[True], errors[False]):
        assert by_matmul < 0.04, name  # bf16 rounding, relative to the largest entry (SDPA: up to 0.03)
        assert by_matmul <= 2 * by_sdpa + 2e-3, (name, by_matmul, by_sdpa)


def test_cpu_training_under_autocast_takes_the_matmul_form(monkeypatch):
    """fp32 leaves under bf16 autocast: computed as SDPA would see them (rounded to bf16), through matmuls
    while autograd records and the run is small; through SDPA when nothing is differentiated or it is large."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    q, k, v = _inputs(6, 10, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention.run_attention(q, k, v)
    assert not calls
    expected = attention.run_attention(*(t.detach().bfloat16() for t in (q, k, v)), matmul=True)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        attention.run_attention(q, k, v)
    assert len(calls) == 1  # scoring: SDPA's forward is as fast
    monkeypatch.setattr(attention, "CPU_MATMUL_ATTENTION_MAX", 10 * 16 - 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attention.run_attention(q, k, v)
    assert len(calls) == 2  # a run above the limit
    attention.run_attention(*(t.detach().double().requires_grad_() for t in (q, k, v)))
    assert len(calls) == 3  # float64 stays on SDPA
