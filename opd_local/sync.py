"""Weight push into the rollout engine (step 8) and the parity probe that proves it (step 9).

Stale engine weights are the classic silent bug of on-policy training: the run keeps going,
but samples come from an old policy. The probe scores one fixed sequence on both sides.
"""

from __future__ import annotations

import torch

from opd_local import parallel
from opd_local.metrics import device_clock
from opd_local.sampler import Sampler


class StaleWeightsError(RuntimeError):
    pass


def push_weights(sampler: Sampler, student) -> float:
    """Push the student's full weights (LoRA merged) into the engine; returns the seconds it took.

    A sharded student is gathered layer by layer, so every rank pushes (each into its own engine).
    """
    device = next(student.parameters()).device
    start = device_clock(device)
    # Tied weights are pushed under every name: an engine that reloads layer by layer (vLLM)
    # otherwise restores its old lm_head and silently unties it from the new embeddings.
    sampler.push_weights(parallel.engine_weights(student))
    return device_clock(device) - start


def parity_probe(sampler: Sampler, student, probe_ids: list[int], threshold: float) -> dict[str, float]:
    """Engine vs trainer |Δlogprob| on `probe_ids[1:]`; raises when the max exceeds `threshold`."""
    engine_lp = torch.tensor(sampler.score(probe_ids), dtype=torch.float32)
    (trainer_lp,) = parallel.score(student, [probe_ids[:1]], [probe_ids[1:]], micro_batch_tokens=len(probe_ids)).logprobs
    delta = (engine_lp - trainer_lp).abs()
    max_abs, mean_abs = float(delta.max()), float(delta.mean())
    if not max_abs <= threshold:  # also catches NaN
        raise StaleWeightsError(
            f"the rollout engine's weights do not match the trainer's: max |Δlogprob| on the probe is "
            f"{max_abs:.4g} (mean {mean_abs:.4g}), above sync.parity_threshold={threshold}. "
            "The weight push did not take effect, or the engine computes a different model."
        )
    return {"sync/parity_max_abs": max_abs, "sync/parity_mean_abs": mean_abs}
