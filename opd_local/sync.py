"""Weight push into the rollout engine (step 8), its weights gathered from any placement (FSDP2 shards,
offloaded layers), the proof before step 0 that a push writes every engine weight exactly, and the
parity probe after every push (step 9).

Stale or misplaced engine weights are the classic silent bug of on-policy training: the run keeps
going, but samples come from another policy. See docs/design.md, "Weight sync" and "Push proof".
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from opd_local.distributed import DistributedModel, all_reduce_max, is_sharded, unwrap
from opd_local.metrics import device_clock
from opd_local.models import base_model, decoder_layers, merged_named_weights, merged_weight_shapes
from opd_local.optimizer import TrainingDiverged
from opd_local.samplers import Sampler
from opd_local.samplers.engine_layout import checkpoint_layout
from opd_local.scoring import score_completions_distributed


class StaleWeightsError(RuntimeError):
    pass


class WeightPushError(RuntimeError):
    pass


def push_model_weights(sampler: Sampler, model, digests: list[torch.Tensor] | None = None) -> float:
    """Push a model's full weights (LoRA merged) into the engine; returns the seconds it took.

    A sharded model is gathered layer by layer, so every rank pushes (each into its own engine).
    With `digests`, a checksum of each tensor as the engine stores it is appended there.
    """
    device = next(model.parameters()).device
    start = device_clock(device)
    # Tied weights are pushed under every name: an engine that reloads layer by layer (vLLM)
    # otherwise restores its old lm_head and silently unties it from the new embeddings.
    weights = gather_engine_weights(model)
    if sampler.weight_layout == "checkpoint":
        weights = checkpoint_layout(base_model(unwrap(model)), weights)
    if digests is not None:
        weights = _digested(weights, sampler.stored, digests, _tied_storages(model))
    sampler.push_weights(weights)
    return device_clock(device) - start


def prove_push(sampler: Sampler, model) -> dict[str, float]:
    """Prove, before step 0, that a push writes every engine weight exactly where the engine's own loader put it.

    `model` must hold the weights the engine loaded from the model's directory (as it does when it has
    just been loaded, before a resumed run restores its checkpoint). The engine overwrites its weights
    with NaN and has `model` pushed (`Sampler.prove_push`): each must then hold, bit for bit, what the
    engine loaded. That holds at any precision, so it catches under bf16 what the parity probe cannot
    tell from rounding: a skipped tensor, a transposed one, an expert in another's slot. Pushes later
    in the run take the same path with other values. Returns its seconds as a metric.
    """
    device = next(model.parameters()).device
    start = device_clock(device)
    wrong = sampler.prove_push(lambda: push_model_weights(sampler, model))
    if all_reduce_max(len(wrong)):
        shown = ", ".join(wrong[:6]) + (f" and {len(wrong) - 6} more" if len(wrong) > 6 else "")
        raise WeightPushError(
            "the weight push does not reproduce the rollout engine's weights: pushed the weights it loaded, it holds "
            f"other values in {len(wrong)} tensors ({shown or 'on another rank'}); the push leaves them stale, misplaced "
            "or unwritten. Pass --rollout.sampler hf to train with transformers as the engine."
        )
    return {"time/push_proof": device_clock(device) - start}


def parity_probe(
    sampler: Sampler, student, probe_ids: list[int], threshold: float, compute_dtype: torch.dtype | None = None
) -> dict[str, float]:
    """Engine vs trainer |Δlogprob| on `probe_ids[1:]`; raises when the max exceeds `threshold`.

    The trainer side runs as it trains (`compute_dtype`, the precision policy's), so the threshold
    only has to cover the two engines' rounding, not a precision the trainer never uses.
    """
    return WeightSync(probe_ids, threshold, compute_dtype).check(sampler, student)


class WeightSync:
    """Steps 8-9 with memory: push, then check that the engine agrees with the trainer and that it
    moved whenever what was pushed changed.

    The absolute check (max |Δlogprob| on the probe against `threshold`) catches an engine that
    computes another model. Under bf16 it cannot catch one skipped push: both sides round their
    logits to bf16, and their disagreement on the probe (up to ~0.2 nats measured at SmolLM2's logit
    scale) is as large as what one AdamW step at a typical learning rate moves it. The movement check
    can: an engine's scores of a fixed sequence are deterministic, so when the pushed weights (as the
    engine stores them) differ from the last push and the engine's probe scores are bit for bit the
    same, the new weights never reached the engine. Comparing what was pushed, not the trainer's own
    scores, matters: a small update (a young LoRA adapter merged into bf16 weights) can round away
    entirely in the engine's dtype while the trainer's scores move.
    """

    def __init__(self, probe_ids: list[int], threshold: float, compute_dtype: torch.dtype | None = None):
        self.probe_ids = probe_ids
        self.threshold = threshold
        self.compute_dtype = compute_dtype
        self.pushed_digest: torch.Tensor | None = None
        self.engine_lp: torch.Tensor | None = None  # at the last check

    def push_and_check(self, sampler: Sampler, student) -> dict[str, float]:
        digests: list[torch.Tensor] = []
        seconds = push_model_weights(sampler, student, digests)
        digest = torch.stack(digests).cpu()  # one device-to-host copy per push, not one per tensor
        pushed_changed = self.pushed_digest is not None and not torch.equal(digest, self.pushed_digest)
        self.pushed_digest = digest
        return {"sync/push_seconds": seconds, **self.check(sampler, student, expect_moved=pushed_changed)}

    def check(self, sampler: Sampler, student, expect_moved: bool = False) -> dict[str, float]:
        engine_lp = torch.tensor(sampler.score(self.probe_ids), dtype=torch.float32)
        (trainer_lp,) = score_completions_distributed(
            student, [self.probe_ids[:1]], [self.probe_ids[1:]], micro_batch_tokens=len(self.probe_ids),
            compute_dtype=self.compute_dtype,
        ).logprobs
        if not torch.isfinite(trainer_lp).all():
            raise TrainingDiverged(
                "the student's own log-probs of the parity probe are not finite: its weights hold inf or NaN (after an "
                "update, training diverged: lower --optim.lr or --optim.skip_grad_norm)"
            )
        delta = (engine_lp - trainer_lp).abs()
        max_abs, mean_abs = float(delta.max()), float(delta.mean())
        if not max_abs <= self.threshold:  # also catches NaN
            raise StaleWeightsError(
                f"the rollout engine's weights do not match the trainer's: max |Δlogprob| on the probe is "
                f"{max_abs:.4g} (mean {mean_abs:.4g}), above sync.parity_threshold={self.threshold}. "
                "The weight push did not take effect, or the engine computes a different model."
            )
        if expect_moved and self.engine_lp is not None and torch.equal(engine_lp, self.engine_lp):
            raise StaleWeightsError(
                "the rollout engine did not change after a weight push that changed its weights: its probe "
                "logprobs are bit for bit those of the last check. The weight push did not take effect."
            )
        self.engine_lp = engine_lp
        return {"sync/parity_max_abs": max_abs, "sync/parity_mean_abs": mean_abs}


_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _digested(named_tensors, stored, digests: list[torch.Tensor], tied: frozenset[int] = frozenset()):
    """`named_tensors` as the push sends them (`stored`, `Sampler.stored`: cast once, here), appending a
    checksum of each: the sum of its bit patterns, which any flipped value changes.

    A tensor whose storage is in `tied` (the data pointers of weights that come under several names:
    tied embeddings and lm_head, at 135M parameters a sixth of the push) is cast and summed once, and
    its cast copy is what the engine gets under every name."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, tensor in named_tensors:
        key = tensor.data_ptr() if tied else None
        if key in tied and key in seen:
            sent, digest = seen[key]
        else:
            sent = stored(name, tensor.detach())
            digest = sent.view(_SAME_WIDTH_INT[sent.dtype]).sum(dtype=torch.int64)
            if key in tied:
                seen[key] = sent, digest
        digests.append(digest)
        yield name, sent


def _tied_storages(student) -> frozenset[int]:
    """Data pointers of the parameters that appear under more than one name (none for a sharded model,
    whose engine weights are gathered copies)."""
    module = unwrap(student)
    if is_sharded(student) or getattr(module, "hf_device_map", None):
        return frozenset()
    pointers = [p.data_ptr() for _, p in module.named_parameters(remove_duplicate=False)]
    return frozenset(ptr for ptr in pointers if ptr and pointers.count(ptr) > 1)  # 0: no storage (meta, empty)


def gather_engine_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """`models.merged_named_weights` (full tensors, LoRA merged, tied weights under every name) for any placement.

    Sharded weights are gathered one layer at a time (collectives: every rank iterates to the end),
    and each tensor is a copy because the gathered memory is freed when the layer reshards.
    Offloaded layers are brought onto the device one at a time by their own accelerate hooks.
    """
    if is_sharded(model):
        root, layers = _fsdp_groups(model)
        root.unshard()
        try:
            groups = [(prefix, layer.unshard, layer.reshard) for prefix, layer in layers]
            for name, tensor in _engine_weights_by_layer(model.module, groups):
                yield name, tensor.clone()
        finally:
            root.reshard()
        return
    module = unwrap(model)
    if getattr(module, "hf_device_map", None):  # placed by accelerate's dispatch_model
        layer_ids = {id(layer) for layer in decoder_layers(module)}
        layers = [(name + ".", m) for name, m in module.named_modules() if id(m) in layer_ids]
        # The loaded tensors stay valid after the hooks put the modules back on `meta`.
        groups = [(prefix, lambda m=m: _run_hooks(m, "pre"), lambda m=m: _run_hooks(m, "post")) for prefix, m in layers]
        yield from _engine_weights_by_layer(module, groups)
        return
    yield from merged_named_weights(module)


def engine_weight_shapes(model) -> dict[str, tuple[int, ...]]:
    """The names and full shapes `gather_engine_weights` would give, without gathering anything."""
    return merged_weight_shapes(unwrap(model))


def _fsdp_groups(model: DistributedModel) -> tuple[nn.Module, list[tuple[str, nn.Module]]]:
    """The FSDP2 root and the sharded layers, with their parameter-name prefixes in `merged_named_weights` naming."""
    from torch.distributed.fsdp import FSDPModule

    base = base_model(model.module)
    layers = [(name + ".", m) for name, m in base.named_modules() if isinstance(m, FSDPModule)]
    return model.root, layers


def _run_hooks(layer: nn.Module, when: str) -> None:
    """Load (pre) or offload (post) a layer's weights with the accelerate hooks its forward would run."""
    for m in layer.modules():
        hook = getattr(m, "_hf_hook", None)
        if hook is None:
            continue
        if when == "pre":
            hook.pre_forward(m)
        else:
            hook.post_forward(m, None)


def _engine_weights_by_layer(module: nn.Module, groups) -> Iterator[tuple[str, torch.Tensor]]:
    """What lies outside every group first, then each group between its `load()` and `unload()`."""
    prefixes = tuple(prefix for prefix, _, _ in groups)
    yield from merged_named_weights(module, only=lambda n: not n.startswith(prefixes))
    for prefix, load, unload in groups:
        load()
        try:
            yield from merged_named_weights(module, only=lambda n, p=prefix: n.startswith(p))
        finally:
            unload()
