"""What every `kernels` op shares: backend dispatch, host-side argument checks, no unwritten output element,
the chunked path's memory bound, and Triton kernels that compile for a Hopper GPU (sm_90) without one.

Also the fresh-process rerun of every `triton` test where this process imported triton before
TRITON_INTERPRET=1 was set (see conftest.triton_state).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kernels
from conftest import triton_state
from oracles import DEVICE, TINY_TILES, V_SMALL, backend_options, linear_inputs, lp64, make_logits

pytestmark = [
    pytest.mark.usefixtures("random_seed", "poisoned_allocations"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # masked interpreter lanes: -inf - -inf, log(0)
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_TEST_FILES = [
    os.path.join(ROOT, "tests", name)
    for name in ("test_kernel_logprob.py", "test_kernel_linear_logprob.py", "test_kernel_divergence.py",
                 "test_kernel_logit_transform.py", "test_kernel_entries.py")
]


@pytest.mark.triton
def test_dispatch():
    from kernels.triton import divergence, logprob

    logits, targets = make_logits(4, 11, "normal")
    assert kernels._impl("token_logprobs", logits, "torch") is kernels.torch_ops.token_logprobs
    assert kernels._impl("token_logprobs", logits, "triton") is logprob.token_logprobs
    assert kernels._impl("topk_reverse_kl", logits, "triton") is divergence.topk_reverse_kl
    expect_auto = logprob.token_logprobs if logits.is_cuda else kernels.torch_ops.token_logprobs
    assert kernels._impl("token_logprobs", logits, "auto") is expect_auto
    assert kernels._impl("token_logprobs", logits.double(), "auto") is kernels.torch_ops.token_logprobs
    with pytest.raises(ValueError, match="backend"):
        kernels.token_logprobs(logits, targets, backend="cuda")
    with pytest.raises(ValueError, match="fp64"):
        kernels.token_logprobs(logits.double(), targets, backend="triton")


def test_reference_is_the_older_name_of_the_torch_backend():
    logits, _ = make_logits(6, 13, "normal")
    teacher = torch.randn(6, 13, device=DEVICE)
    torch_kl = kernels.full_reverse_kl(logits, teacher, 0.8, backend="torch", chunk_tokens=4)
    reference_kl = kernels.full_reverse_kl(logits, teacher, 0.8, backend="reference", chunk_tokens=4)
    assert torch.equal(torch_kl, reference_kl)
    assert kernels._impl("linear_divergence_loss", logits, "reference") is kernels.torch_ops.linear_divergence_loss
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\), got 'cuda'"):
        kernels.full_reverse_kl(logits, teacher, backend="cuda")


def test_shape_errors_are_clear(backend):
    logits, targets = make_logits(5, 11, "normal")
    zeros = torch.zeros(5, device=DEVICE)
    with pytest.raises(ValueError, match="targets"):
        kernels.token_logprobs(logits, targets[:4], backend=backend)
    with pytest.raises(ValueError, match="rollout_lp"):
        kernels.opd_loss(logits, targets, zeros, torch.zeros(6, device=DEVICE), normalizer=5.0, backend=backend)
    with pytest.raises(ValueError, match="normalizer"):
        kernels.opd_loss(logits, targets, zeros, zeros, normalizer=0.0, backend=backend)
    with pytest.raises(ValueError, match="H differs"):
        kernels.linear_token_logprobs(
            torch.randn(5, 4, device=DEVICE), torch.randn(11, 3, device=DEVICE), targets, backend=backend
        )
    with pytest.raises(ValueError, match="logits"):
        kernels.token_logprobs(logits[None], targets, backend=backend)


@pytest.mark.parametrize("bad", [-1, V_SMALL])
def test_out_of_range_targets_are_refused_on_the_host(backend, bad):
    # Checked before any launch, with a host-side ValueError: on CUDA a device-side assert loses its
    # message and kills the context, so the check must not be left to the device.
    logits, targets = make_logits(6, V_SMALL, "normal")
    hidden, weight, _ = linear_inputs(6, 16, V_SMALL, torch.float32)
    targets = targets.cpu()
    targets[3] = bad
    lin = backend_options(backend, 4, tiles=TINY_TILES)
    calls = [
        lambda: kernels.token_logprobs(logits, targets, backend=backend),
        lambda: kernels.opd_loss(logits, targets, targets.float(), targets.float(), normalizer=6.0, backend=backend),
        lambda: kernels.linear_token_logprobs(hidden, weight, targets, **lin),
        lambda: kernels.linear_opd_loss(hidden, weight, targets, targets.float(), targets.float(), normalizer=6.0, **lin),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=rf"targets must lie in \[0, V={V_SMALL}\).*\[{bad}\]"):
            call()


def test_every_output_element_is_written(backend):
    # poisoned_allocations fills each torch.empty(_like) with NaN; one forgotten row, column or tail shows here.
    assert torch.isnan(torch.empty(3)).all()
    n, v, h = 19, 77, 24  # no block, tile or chunk size divides any of them
    logits, targets = make_logits(n, v, "normal", torch.bfloat16)
    logits.requires_grad_(True)
    teacher = make_logits(n, v, "normal", torch.bfloat16)[0]
    lp_small = lp64(logits.detach(), targets).float()
    logit_options = backend_options(backend, 8, block_v=32)
    outputs = [
        kernels.token_logprobs(logits, targets, **logit_options),
        *kernels.opd_loss(logits, targets, lp_small, lp_small - 0.1, normalizer=n, **logit_options),
        kernels.full_reverse_kl(logits, teacher, **logit_options),
        kernels.topk_reverse_kl(logits, teacher, 3, **logit_options),
    ]
    hidden, weight, lin_targets = linear_inputs(n, h, v, torch.bfloat16)
    linear_options = backend_options(backend, 8, tiles=TINY_TILES)
    outputs += [
        kernels.linear_token_logprobs(hidden, weight, lin_targets, **linear_options),
        *kernels.linear_opd_loss(hidden, weight, lin_targets, lp_small, lp_small, normalizer=n, **linear_options),
    ]
    for i, out in enumerate(outputs):
        assert torch.isfinite(out).all(), f"output {i} has unwritten (NaN) elements"
    differentiable = [o for o in outputs if o.requires_grad]
    grads = torch.autograd.grad([o.sum() for o in differentiable], (logits, hidden, weight))
    for name, grad in zip(("dlogits", "dhidden", "dweight"), grads):
        assert torch.isfinite(grad).all(), f"{name} has unwritten (NaN) elements"


@pytest.mark.triton
def test_kernels_give_nan_rather_than_a_value_for_an_unchecked_bad_target():
    # Targets already on the device are not checked on the host (that would sync): the kernels themselves
    # must then mark the row, not return -lse as if the target were a column with zero probability.
    from kernels.triton import linear_logprob, logprob

    logits, targets = make_logits(5, V_SMALL, "normal")
    targets[2] = V_SMALL + 4
    hidden, weight, _ = linear_inputs(5, 16, V_SMALL, torch.float32)
    with torch.no_grad():
        lp = logprob._TokenLogprobs.apply(logits, targets, 1.0, None, (1.0, None))
        opd_lp = logprob._OPDLoss.apply(
            logits, targets, lp.nan_to_num(), lp.nan_to_num(), (1.0, 2.0, 5.0, 1.0, True, None, 1.0, None), False
        )[1]
        lin_lp = linear_logprob._LinearTokenLogprobs.apply(hidden, weight, targets, 1.0, TINY_TILES, (1.0, None))
    good = torch.arange(5, device=DEVICE) != 2
    for out in (lp, opd_lp, lin_lp):
        assert torch.isnan(out[2]) and torch.isfinite(out[good]).all()


def test_chunked_path_never_allocates_n_by_v():
    dispatch = pytest.importorskip("torch.utils._python_dispatch")
    n, h, v, chunk = 64, 4, 257, 8  # h < chunk, so weight.T [H, V] is not mistaken for [N, V]
    big = []

    class RecordLarge(dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 2 and t.shape[1] == v \
                        and t.shape[0] > chunk:
                    big.append((str(func), tuple(t.shape)))
            return out

    logits = torch.randn(n, v).bfloat16().requires_grad_(True)  # the [N, V] gradient is bf16, not fp32
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    lp = torch.randn(n)
    ops = kernels.torch_ops
    with RecordLarge():
        ops.token_logprobs(logits, targets, chunk_tokens=chunk).sum().backward()
        ops.opd_loss(logits, targets, lp, lp, normalizer=n, chunk_tokens=chunk)[0].backward()
        ops.linear_token_logprobs(hidden, weight, targets, chunk_tokens=chunk).sum().backward()
        ops.linear_opd_loss(hidden, weight, targets, lp, lp, normalizer=n, chunk_tokens=chunk)[0].backward()
    assert big == []


# --- the kernels compile for a Hopper GPU (sm_90), without one ---------------------------------

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "0"
    sys.path.insert(0, sys.argv[1])
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.backends.nvidia.compiler import get_ptxas_version
        get_ptxas_version(90)  # the wheel's ptxas runs on this machine
        target = GPUTarget("cuda", 90, 32)
    except Exception as exc:  # an API this check cannot use: not a kernel error
        print("SKIP", exc)
        sys.exit(0)
    from kernels.triton import divergence as D, linear_logprob as LL, linear_tiles, logprob as L

    def build(fn, consts, warps, dtype):
        types = {"V": "i32", "N": "i32", "H": "i32", "kl_coef": "fp32", "log_ratio_cap": "fp32"}
        types.update(dict.fromkeys(("inv_temp", "cap_in", "cap_out", "t_inv_temp", "t_cap_in", "t_cap_out"), "fp32"))
        half = {"logits_ptr", "dlogits_ptr", "h_ptr", "w_ptr", "s_ptr", "t_ptr", "ds_ptr", "thr_ptr"}
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in types:
                sig[name] = types[name]
            elif "stride" in name:
                sig[name] = "i64"
            elif name == "targets_ptr":
                sig[name] = "*i64"
            elif name == "argmax_ptr":
                sig[name] = "*i32"
            else:
                sig[name] = "*" + dtype if name in half else "*fp32"
        triton.compile(ASTSource(fn, sig, constexprs=consts), target=target, options=dict(num_warps=warps))

    # The softcapped variants once each, in bf16 (the dtype a capped model trains in).
    for dtype, softcap in (("bf16", False), ("fp32", False), ("bf16", True)):
        cap = dict(SOFTCAP=softcap)
        build(L._logprob_fwd_kernel, dict(BLOCK_V=4096, **cap), 8, dtype)
        build(L._logprob_bwd_kernel, dict(BLOCK_V=4096, **cap), 8, dtype)
        for single, block, warps in ((False, 4096, 8), (True, 16384, 16)):
            build(L._opd_fwd_kernel, dict(IMPORTANCE_RATIO=True, NEED_GRAD=True, SINGLE_BLOCK=single, BLOCK_V=block,
                                          **cap), warps, dtype)
        bn, bv, bh, warps = linear_tiles.GPU_TILES
        tiles = dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, UPCAST=False, PRECISION="ieee" if dtype == "fp32" else "tf32",
                     **cap)
        build(LL._linear_fwd_kernel, dict(OPD=True, IMPORTANCE_RATIO=True, **tiles), warps, dtype)
        build(LL._linear_dh_kernel, tiles, warps, dtype)
        build(LL._linear_dw_kernel, tiles, warps, dtype)
        for topk in (False, True):
            sides = dict(SOFTCAP=softcap, T_SOFTCAP=softcap)
            build(D._rkl_fwd_kernel, dict(TOPK=topk, BLOCK_V=4096, **sides), 8, dtype)
            build(D._rkl_bwd_kernel, dict(TOPK=topk, BLOCK_V=4096, **sides), 8, dtype)
    print("OK")
    """
)


@pytest.mark.triton
def test_kernels_compile_for_sm90():
    # The interpreter runs the kernels as numpy; this runs the real compiler (to PTX and cubin, with the
    # wheel's ptxas) on the GPU configurations, so a construct only the GPU path rejects fails here.
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, ROOT], capture_output=True, text=True, env=env, timeout=600
    )
    if proc.stdout.startswith("SKIP"):
        pytest.skip(f"cannot drive the Triton compiler without a GPU here: {proc.stdout.strip()}")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.skipif(not triton_state()[1], reason="the triton tests ran in this process")
def test_in_a_fresh_interpreter_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *KERNEL_TEST_FILES, "-m", "triton", "-q", "-p", "no:cacheprovider"],
        capture_output=True, text=True, env=env, timeout=1200, cwd=ROOT,
    )
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-4000:]
