"""The precision policy: the dtype of every part of a run, resolved once at start-up.

`--dtype auto` computes in bf16 wherever the hardware multiplies in bf16 natively (CUDA with bf16,
CPUs with AMX-BF16 or AVX512-BF16), over fp32 master weights and fp32 AdamW state; elsewhere it
stays fp32. `--dtype float32` / `bfloat16` force either choice. The frozen teacher, the fused
loss's inputs and the rollout engine follow the compute dtype. See docs/design.md, "Precision".
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

# What `model.dtype` accepts, with the common short spellings.
DTYPE_SPELLINGS = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}

# Default `sync.parity_threshold` by engine dtype: the largest engine-vs-trainer |Δlogprob| the probe
# may show with the weights in sync. fp32 engines agree with the trainer to ~1e-4, so 0.05 is slack
# that still catches one AdamW step. A bf16 engine and a bf16-autocast trainer round differently (on
# CPU both round the logits themselves to bf16): measured on SmolLM2-135M up to 0.18 on the probe and
# 0.30 on rollouts at its own logit scale, and up to 0.99 with its logits scaled 4x (bf16 steps grow
# with the logits). 1.5 leaves half again the worst of those; below it, a skipped push is caught by
# the movement check in `sync.WeightSync`, not by this threshold (benchmarks/RESULTS.md, "Precision:
# engine-vs-trainer agreement under bf16").
PARITY_THRESHOLDS = {torch.float32: 0.05, torch.bfloat16: 1.5}


def canonical_dtype(setting: str, field: str = "model.dtype") -> str:
    """`auto`, `float32` or `bfloat16`; anything else is refused, never silently replaced."""
    key = str(setting)
    choices = DTYPE_SPELLINGS if field == "model.dtype" else {k: v for k, v in DTYPE_SPELLINGS.items() if k != "auto"}
    if key not in choices:
        allowed = "auto, float32 (fp32) or bfloat16 (bf16)" if "auto" in choices else "float32 (fp32) or bfloat16 (bf16)"
        raise ValueError(f"{field}={setting!r}; choose {allowed}")
    return choices[key]


def multiplies_in_bf16(device: torch.device) -> bool:
    """Whether `device` has native bf16 matrix units, as torch reports them (no list of models)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        cpu = torch.cpu
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(cpu, name, lambda: False)() for name in checks)
    return False


@dataclass(frozen=True)
class PrecisionPolicy:
    """Which dtype each part of a run computes or stores in."""

    device_type: str
    compute: torch.dtype  # matmuls of the student's forward and backward (autocast below the master dtype)
    master: torch.dtype  # the student's trained weights, and with them its gradients and AdamW state
    teacher: torch.dtype  # the frozen teacher's stored weights: it has no master copy to keep
    engine: torch.dtype  # the rollout engine's weights and compute
    reason: str  # why `auto` chose what it chose, for the start-up line

    @property
    def loss_inputs(self) -> torch.dtype:
        """Hidden states and lm_head handed to the fused loss: the compute dtype (it accumulates in fp32)."""
        return self.compute

    @property
    def engine_name(self) -> str:
        return str(self.engine).removeprefix("torch.")

    def autocast(self):
        """Autocast to the compute dtype when it is below the master dtype; a no-op otherwise."""
        return autocast_to(self.device_type, self.compute)

    def parity_threshold(self, configured: float) -> float:
        """`sync.parity_threshold`, where 0 means the engine dtype's default."""
        return configured if configured > 0 else PARITY_THRESHOLDS[self.engine]

    def describe(self) -> str:
        name = lambda dtype: {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]  # noqa: E731
        return (
            f"precision: {name(self.compute)} compute over {name(self.master)} master weights and {name(self.master)} "
            f"AdamW state; teacher {name(self.teacher)}, loss inputs {name(self.loss_inputs)}, "
            f"engine {name(self.engine)} ({self.reason})"
        )


def autocast_to(device_type: str, compute: torch.dtype | None):
    """bf16 autocast for `compute=bfloat16`; nothing for fp32, fp64 or None (the weights' own dtype)."""
    if compute is None or compute.itemsize >= 4:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=compute)


def resolve_precision(setting: str, device: torch.device, master: str = "float32") -> PrecisionPolicy:
    """The policy for `model.dtype` (and `model.master_dtype`) on `device`.

    auto: bf16 compute where `device` multiplies in bf16 natively, else fp32. float32 / bfloat16:
    that compute dtype whatever the hardware (bf16 without bf16 units is emulated: correct, slow).
    Master weights, gradients and AdamW state are fp32 unless `master` is bfloat16, which halves
    their memory at a cost: AdamW steps smaller than half a bf16 step of a weight are lost.
    """
    choice, master_dtype = canonical_dtype(setting), getattr(torch, canonical_dtype(master, "model.master_dtype"))
    if master_dtype == torch.bfloat16 and choice == "float32":
        raise ValueError("model.master_dtype=bfloat16 with model.dtype=float32: fp32 compute over bf16 weights gains nothing")
    if choice == "auto":
        native = multiplies_in_bf16(device)
        if native:
            reason = "auto: " + ("CUDA bf16" if device.type == "cuda" else "the CPU reports AMX-BF16 or AVX512-BF16")
        else:
            reason = f"auto: no native bf16 on {device.type}"
        compute = torch.bfloat16 if native or master_dtype == torch.bfloat16 else torch.float32
    else:
        compute, reason = getattr(torch, choice), f"forced {choice}"
    return PrecisionPolicy(device.type, compute, master_dtype, compute, compute, reason)
