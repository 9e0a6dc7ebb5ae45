"""The frozen teacher of a run: its weights, where they live (replicated, sharded or offloaded), and its scores
(docs/design.md, "The step", 4).

`Teacher.build` makes it in one call, for training and for stand-alone evaluation alike. With LoRA
on the teacher's own base model, the teacher is the student with the adapter switched off, so no
second copy is held in memory.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
from pathlib import Path

import torch

from opd_local.config import Config, ModelConfig, choices
from opd_local.distributed import full_lm_head, shard_model, unwrap
from opd_local.loss import needs_teacher_hidden
from opd_local.models import decoder_layers, load_frozen_teacher
from opd_local.output_heads import check_output_head, logit_transform, token_rows
from opd_local.rollouts import Rollout, drop_past_teacher_rows
from opd_local.scoring import score_completions_distributed


class Teacher:
    """A frozen model that scores completions behind the teacher prompt.

    `head` is the full lm_head weight, held when the objective reads the teacher's hidden states
    (frozen, so one reference serves every step), and `logit_transform` the (scale, softcap) its logits
    take after it (`output_heads.logit_transform`); `offload_dir` is where a disk-placed teacher's layers live
    until `close()`.
    """

    def __init__(
        self,
        model,
        *,
        micro_batch_tokens: int,
        name: str = "",
        adapter_off: bool = False,
        context: str = "privileged",
        head: torch.Tensor | None = None,
        chunk_tokens: int = 1024,
        shared_prefix: bool = False,
        compute_dtype: torch.dtype | None = None,
        offload_dir: Path | None = None,
    ):
        self.model = model
        self.name = name
        self.adapter_off = adapter_off
        self.context = context
        self.head = head
        self.logit_transform = logit_transform(unwrap(model))
        self.micro_batch_tokens = micro_batch_tokens
        self.chunk_tokens = chunk_tokens
        self.shared_prefix = shared_prefix
        self.compute_dtype = compute_dtype
        self.offload_dir = offload_dir

    @classmethod
    def build(cls, cfg: Config, inputs, precision, ctx, student=None, layout: str = "none") -> Teacher:
        """The run's teacher from `inputs` (`RunInputs`), placed by `model.teacher_placement`.

        Without a `student` (stand-alone evaluation of a saved model, which has no adapter to switch
        off) the teacher's weights are always loaded.
        """
        offload_dir = None
        if inputs.resolved.teacher_weights == "base_adapter_off" and student is not None:
            model, adapter_off = student, True
        else:
            placement = resolve_teacher_placement(cfg.model.teacher_placement, layout)
            offload_dir = Path(cfg.model.teacher_offload_dir or Path(cfg.run.out_dir) / "teacher-offload") / f"rank{ctx.rank}"
            frozen = load_frozen_teacher(inputs.teacher_path, cfg.model, precision.teacher, torch.device("cpu"))
            check_output_head(frozen, "model.teacher" if cfg.model.teacher else "model.student")
            model = place_teacher(frozen, placement, ctx.device, str(offload_dir), cfg.run.reshard_after_forward)
            adapter_off = False
        return cls(
            model,
            micro_batch_tokens=inputs.resolved.micro_batch_tokens,
            name=inputs.teacher_path,
            adapter_off=adapter_off,
            context=cfg.model.teacher_context,
            head=full_lm_head(model) if needs_teacher_hidden(cfg.loss) else None,
            chunk_tokens=cfg.loss.chunk_tokens,
            shared_prefix=cfg.model.teacher_shared_prefix,
            compute_dtype=precision.compute,
            offload_dir=offload_dir,
        )

    def scope(self):
        """Where the teacher's weights are in force: the student's base with the adapter off, or always."""
        return self.model.disable_adapter() if self.adapter_off else contextlib.nullcontext()

    @functools.cached_property
    def vocabulary_rows(self) -> int:
        """How many token ids the teacher can read and score (`output_heads.token_rows`), read once."""
        return token_rows(unwrap(self.model))

    def score(self, rollouts: list[Rollout]) -> list[Rollout]:
        """Score the rollouts still kept, record the scores on them, and return those the scores leave kept."""
        drop_past_teacher_rows(rollouts, self.vocabulary_rows)  # a student head padded wider
        scorable = [r for r in rollouts if r.kept]
        with self.scope():
            scores = score_completions_distributed(
                self.model,
                # plain: the control, the teacher on the student's own prompt; the gain over it is what
                # the privileged context adds.
                [r.group.training_teacher_prompt(self.context) for r in scorable],
                [r.completion_ids for r in scorable],
                micro_batch_tokens=self.micro_batch_tokens,
                chunk_tokens=self.chunk_tokens,
                return_hidden=self.head is not None,
                shared_prefix=self.shared_prefix,
                compute_dtype=self.compute_dtype,
            )
        if len(scores.logprobs) != len(scorable):
            raise RuntimeError(f"teacher returned {len(scores.logprobs)} score vectors for {len(scorable)} rollouts")
        for i, rollout in enumerate(scorable):
            rollout.record_teacher_scores(scores.logprobs[i], None if scores.hiddens is None else scores.hiddens[i])
        return [r for r in scorable if r.kept]

    def trace_logprobs(self, prompts: list[list[int]], traces: list[list[int]]) -> list[torch.Tensor]:
        """Logprobs of the teacher's own traces behind their prompts (evaluation), each packed with its own prompt."""
        with self.scope():
            return score_completions_distributed(
                self.model, prompts, traces, micro_batch_tokens=self.micro_batch_tokens, compute_dtype=self.compute_dtype
            ).logprobs

    def close(self) -> None:
        if self.offload_dir is not None and self.offload_dir.exists():
            # Copies of frozen weights that nothing resumes from: a disk-placed 8B teacher is 16 GB per rank.
            shutil.rmtree(self.offload_dir, ignore_errors=True)
            with contextlib.suppress(OSError):  # the shared parent, once the last rank's folder is gone
                self.offload_dir.parent.rmdir()


def resolve_teacher_placement(choice: str, student_layout: str) -> str:
    """`model.teacher_placement` with auto resolved: sharded beside a sharded student, else a replica. The one rule
    here that pre-flight cannot check is the one that needs the student's layout, which `auto` settles by its size."""
    placements = choices(ModelConfig, "teacher_placement")
    if choice not in placements:
        raise ValueError(f"model.teacher_placement={choice!r}; choose one of {', '.join(placements)}")
    if choice == "auto":
        return "shard" if student_layout == "fsdp" else "replica"
    if choice == "shard" and student_layout != "fsdp":
        raise ValueError("model.teacher_placement=shard needs a sharded student (run.parallel=fsdp under torchrun)")
    return choice


def place_teacher(
    model: torch.nn.Module, placement: str, device: torch.device, offload_dir: str, reshard_after_forward: bool = True
):
    """The frozen teacher (loaded on the CPU) put where `placement` says.

    replica: whole on this rank's device. shard: FSDP2 over the ranks, gathered layer by layer.
    cpu / disk: accelerate keeps the decoder layers in host memory (or memory-mapped files under
    `offload_dir`) and moves each onto the device for its own forward; embeddings, final norm and
    lm_head stay on the device, because the scoring pass reads the lm_head weight directly.
    """
    if placement == "replica":
        return model.to(device)
    if placement == "shard":
        return shard_model(model, device, reshard_after_forward)
    if placement in ("cpu", "disk"):
        return _offload(model, placement, device, offload_dir)
    raise ValueError(f"unknown teacher placement {placement!r}")


def _offload(model: torch.nn.Module, placement: str, device: torch.device, offload_dir: str) -> torch.nn.Module:
    from accelerate import dispatch_model

    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder `layers` to offload; use model.teacher_placement=replica")
    shutil.rmtree(offload_dir, ignore_errors=True)  # accelerate would reuse files left by another teacher
    if placement == "cpu" and device.type == "cuda":
        # accelerate copies each layer to the GPU on every forward; from page-locked memory the
        # copy is a direct DMA, from pageable memory it goes through a staging buffer at a
        # fraction of the bandwidth. Pinned one tensor at a time: no second copy of the teacher.
        for layer in layers:
            for param in layer.parameters():
                param.data = param.data.pin_memory()
    layer_ids = {id(layer) for layer in layers}
    layer_names = [name for name, module in model.named_modules() if id(module) in layer_ids]
    main = device.index if device.type == "cuda" else "cpu"
    device_map: dict[str, str | int] = {name: placement for name in layer_names}
    for name, module in model.named_modules():
        inside = any(name.startswith(mapped + ".") for mapped in device_map) or name in device_map
        holds_layers = name == "" or any(layer.startswith(name + ".") for layer in layer_names)
        if not inside and not holds_layers:
            device_map[name] = main
    # Buffers outside any listed module (rotary tables) follow the main device.
    return dispatch_model(model, device_map=device_map, main_device=main, offload_dir=offload_dir or None)
