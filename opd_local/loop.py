"""The OPD training loop: one step of docs/design.md ("The step") top to bottom.

data → sample (student prompt) → validate → teacher scores (privileged prompt) → packed student
forward + fused loss → AdamW → push weights into the engine → parity probe → metrics.
"""

from __future__ import annotations

import functools
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from tqdm.auto import tqdm

from opd_local import distributed
from opd_local.checkpoint import load_training_state, save_final_model, save_training_state
from opd_local.config import Config
from opd_local.evaluation import Evaluator, teacher_greedy
from opd_local.metrics import MetricsLogger, flush_logs_to_disk, span
from opd_local.models import load_student
from opd_local.optimizer import DivergenceGuard, apply_optim_config, build_optimizer
from opd_local.output_heads import check_output_head, check_output_heads
from opd_local.packing_check import check_run_models
from opd_local.precision import resolve_precision
from opd_local.preflight import check_config, resolve
from opd_local.progress import GroupStream, RunTotals
from opd_local.report import write_report
from opd_local.rollouts import build_rollouts, rollout_metrics
from opd_local.run_directory import FINAL_MODEL, check_run_directory, claim_run_directory, interrupted, start_run_directory
from opd_local.run_lock import RunDirectoryBusy
from opd_local.run_inputs import load_run_inputs
from opd_local.samplers import make_sampler, rollout_seeds
from opd_local.sync import WeightSync, prove_push
from opd_local.teacher import Teacher
from opd_local.training import train_on_rollouts


def train(cfg: Config) -> Path:
    # ---- checks: everything that can refuse the run does so before a model loads or the run directory is written ----
    check_config(cfg)
    ctx = distributed.init_distributed(cfg.run.device)
    # First: an unknown dtype is refused before anything is written.
    precision = resolve_precision(cfg.model.dtype, ctx.device, cfg.model.master_dtype)
    run_dir = Path(cfg.run.out_dir)
    lock = claim(cfg, ctx)  # one owner per run directory, from here to the end of the run, however it ends
    sampler = logger = overwrite = None
    position = None  # where the run is, for the line Ctrl-C prints; None until the run directory is written
    try:
        resume = check_run_directory(cfg)  # None for a new run; a resume's newest intact checkpoint
        resolved = resolve(cfg, ctx.device)  # worked out once, carried to every stage
        inputs = load_run_inputs(cfg, resolved)
        stream = GroupStream(inputs.train_groups, seed=cfg.run.seed, shuffle=cfg.data.shuffle)
        totals = RunTotals()
        if resume:
            stream.load_state_dict(resume.progress["stream"])  # refuses other rows than the checkpoint's
        start_step = resume.step if resume else 0

        # ---- set-up ----
        # The engine before anything of the trainer's: vLLM claims its share of the GPU from the memory
        # free at start-up, which the trainer's weights and its allocator's cache would have taken.
        sampler = make_sampler(cfg, inputs.student_path, ctx.device, inputs.tokenizer, precision.engine)
        if ctx.is_main:
            tqdm.write(precision.describe())
        trainer = build_trainer(cfg, ctx, precision, inputs, sampler)
        student, teacher, optimizer, scheduler = trainer.student, trainer.teacher, trainer.optimizer, trainer.scheduler
        if resume:
            restore_training_state(cfg, ctx, resume, trainer, totals)
        # The engine starts from the trainer's weights (the checkpoint's on resume), proven before step 0;
        # this also gives the movement check of step 9 its baseline.
        trainer.weight_sync.push_and_check(sampler, student)
        if ctx.is_main:
            # Only now is anything in the run directory written; a run it overwrites is kept aside until this one stands.
            overwrite = start_run_directory(cfg, resume)
            tqdm.write(inputs.summary())
        position = f"before step {start_step}"
        distributed.barrier()
        logger = open_metrics_logger(cfg, ctx, resumed_at=start_step if resume else None)
        evaluator = build_evaluator(cfg, ctx, precision, resolved, inputs, stream, sampler, trainer)
        divergence = DivergenceGuard(cfg.optim)

        # A progress bar only on a terminal: in a log file each redraw is more text, and a step's output is its one line.
        bar = dict(desc="opd", initial=start_step, total=cfg.run.steps, disable=not (ctx.is_main and sys.stderr.isatty()))
        for step in tqdm(range(start_step, cfg.run.steps), **bar):
            position = f"at step {step}"
            metrics: dict[str, float] = {**inputs.counts, **trainer.start_metrics} if step == 0 else {}
            if evaluator is not None and evaluator.due(step):
                metrics.update(evaluator.run(step, student, sampler))

            with span(metrics, "step", ctx.device):
                # 1-2. draw this rank's prompt groups and sample K completions each from the student prompt
                all_groups = stream.next_groups(cfg.rollout.groups_per_step)
                step_groups = distributed.shard_for_rank(all_groups, ctx)
                group_seeds = distributed.shard_for_rank(rollout_seeds(cfg.run.seed, step, len(all_groups), cfg.rollout.samples_per_group), ctx)
                with span(metrics, "sample", ctx.device):
                    completions = sampler.generate(
                        [g.student_prompt_ids for g in step_groups],
                        n=cfg.rollout.samples_per_group,
                        temperature=cfg.rollout.temperature,
                        max_tokens=cfg.rollout.max_tokens,
                        seed=group_seeds,
                    )
                    sampler.release_memory()

                # 3-4. validate, then the frozen teacher scores the same tokens behind its prompt (privileged or plain)
                with span(metrics, "score", ctx.device):
                    rollouts = build_rollouts(step_groups, completions)
                    kept = teacher.score(rollouts)

                # 5-7. packed student forward, fused loss over the step's global active tokens, then clip, AdamW
                # (skipped, and counted, when the loss or gradient norm is not finite or absurd), schedule, zero
                with span(metrics, "train", ctx.device):
                    metrics.update(
                        train_on_rollouts(
                            student, optimizer, scheduler, kept, cfg, precision, resolved.micro_batch_tokens,
                            teacher.head, teacher.logit_transform,
                        )
                    )

                # 8-9. push the new weights into the engine in place, then prove they arrived
                with span(metrics, "push", ctx.device):
                    metrics.update(trainer.weight_sync.push_and_check(sampler, student))

                # 10. metrics, reduced over ranks, and the run totals they add to
                step_counts = rollout_metrics(rollouts, kept, len(step_groups))
                metrics.update(step_counts)
                metrics.update(totals.add(step_counts))
            metrics["optim/lr"] = scheduler.get_last_lr()[0]
            logger.log(step, metrics)
            divergence.check(step, metrics)  # stops the run after optim.max_skipped_steps skipped steps in a row
            if cfg.run.save_every > 0 and (step + 1) % cfg.run.save_every == 0:
                save_checkpoint(cfg, ctx, step + 1, trainer, stream, totals)
                if overwrite is not None:
                    overwrite.commit()  # the new run stands: the one it replaced goes
        position = "after the last step"

        if evaluator is not None:  # the end point of every eval curve
            logger.log(cfg.run.steps, evaluator.run(cfg.run.steps, student, sampler))
        if cfg.run.save_final:
            replica = functools.partial(load_student, inputs.student_path, cfg.model, precision.master, cfg.run.seed)
            save_final_model(student, inputs.tokenizer, run_dir / FINAL_MODEL, ctx, replica)
        logger.close()
        teacher.close()
        if overwrite is not None:
            overwrite.commit()
    except BaseException as err:
        restored = False
        if overwrite is not None and not overwrite.done:
            if logger is not None:
                logger.close()
            overwrite.restore()
            restored = True
            if not isinstance(err, KeyboardInterrupt):
                warnings.warn(f"the run failed before it stood; {run_dir} holds the run it replaced, as it was")
        if isinstance(err, KeyboardInterrupt):
            raise interrupted(run_dir, position, restored) from None
        raise
    finally:
        if sampler is not None:
            sampler.close()  # also when the run is refused or fails: a process may build another engine after it
        if lock is not None:
            lock.release()
    if ctx.is_main:
        tqdm.write(write_report(run_dir))
    distributed.barrier()
    return run_dir


# ---- set-up, in the order train() runs it ----


@dataclass
class Trainer:
    """What the set-up builds beside the engine, proven before step 0."""

    student: object  # wrapped for the run's layout (`distributed.wrap_student`)
    teacher: Teacher
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    weight_sync: WeightSync
    start_metrics: dict[str, float]  # the push proof's and the packing check's, logged with step 0


def build_trainer(cfg: Config, ctx, precision, inputs, sampler) -> Trainer:
    """The student (wrapped for its layout), the teacher, the optimizer and the weight sync, each checked."""
    student = load_student(inputs.student_path, cfg.model, precision.master, cfg.run.seed)
    check_output_head(student, "model.student")
    layout = distributed.resolve_layout(cfg.run.parallel, distributed.count_parameters(student), cfg.run.ddp_max_params, ctx.world_size)
    student = distributed.wrap_student(student, layout, ctx.device, cfg.run.reshard_after_forward, precision.compute).train()
    # While the student still holds the weights the engine loaded: a push must reproduce them bit for bit.
    push_proof = prove_push(sampler, student)
    teacher = Teacher.build(cfg, inputs, precision, ctx, student=student, layout=layout)
    vocabulary = len(inputs.tokenizer)
    check_output_heads(distributed.unwrap(student), distributed.unwrap(teacher.model), cfg.loss.objective, vocabulary)
    # Before step 0: the row layouts this run packs are proven exact on these very models, or dropped.
    log = tqdm.write if ctx.is_main else (lambda line: None)
    packing_metrics = check_run_models(student, teacher, cfg, precision.compute, vocabulary, log)
    optimizer, scheduler = build_optimizer(student, cfg.optim)
    probe_ids = inputs.tokenizer(cfg.sync.probe_text)["input_ids"]
    weight_sync = WeightSync(probe_ids, precision.parity_threshold(cfg.sync.parity_threshold), precision.compute)
    return Trainer(student, teacher, optimizer, scheduler, weight_sync, {**packing_metrics, **push_proof})


def restore_training_state(cfg: Config, ctx, resume, trainer: Trainer, totals: RunTotals) -> None:
    """A resume's checkpoint into the trainer and the run totals."""
    progress = load_training_state(resume.checkpoint, trainer.student, trainer.optimizer, trainer.scheduler, ctx)
    apply_optim_config(trainer.optimizer, trainer.scheduler, cfg.optim)  # flags given with --resume win over the saved ones
    totals.load_state_dict(progress["cumulative"])


def open_metrics_logger(cfg: Config, ctx, resumed_at: int | None) -> MetricsLogger:
    """The run's logs; a resume drops what the logs hold past its checkpoint (`resumed_at`)."""
    return MetricsLogger(
        Path(cfg.run.out_dir),
        enabled=ctx.is_main,
        wandb_project=cfg.run.wandb_project if cfg.run.wandb else None,
        wandb_config=cfg.to_dict(),
        purge_step=resumed_at,
    )


def build_evaluator(cfg: Config, ctx, precision, resolved, inputs, stream, sampler, trainer: Trainer) -> Evaluator | None:
    """The teacher-trace evaluator, its traces ready; None when eval is off or another rank evaluates."""
    student, teacher, tokenizer = trainer.student, trainer.teacher, inputs.tokenizer
    # Sharded weights are gathered by all ranks together, so then every rank evaluates (rank 0 writes).
    if cfg.eval.every == 0 or not (ctx.is_main or distributed.is_sharded(student) or distributed.is_sharded(teacher.model)):
        return None
    evaluator = Evaluator(
        cfg, Path(cfg.run.out_dir), inputs.heldout_groups, stream.first_groups(cfg.eval.train_rows), tokenizer,
        resolved.micro_batch_tokens, write=ctx.is_main, compute_dtype=precision.compute,
    )
    evaluator.prepare(teacher_greedy(sampler, teacher, student, tokenizer.eos_token_id, tokenizer.pad_token_id), teacher)
    return evaluator


def save_checkpoint(cfg: Config, ctx, step: int, trainer: Trainer, stream: GroupStream, totals: RunTotals) -> None:
    """A resumable checkpoint at `step`, the logs on disk first so that the resume finds them whole."""
    # "cumulative" is the checkpoint format's key for the run totals.
    progress = {"stream": stream.state_dict(), "cumulative": totals.state_dict()}
    if ctx.is_main:
        flush_logs_to_disk(Path(cfg.run.out_dir))
    save_training_state(
        Path(cfg.run.out_dir), step, trainer.student, trainer.optimizer, trainer.scheduler, progress, ctx,
        cfg.run.keep_checkpoints,
    )


def claim(cfg: Config, ctx):
    """The run directory's lock, taken by the main rank; every rank refuses alike when it is held."""
    lock, refusal = None, None
    if ctx.is_main:
        try:
            lock = claim_run_directory(cfg)
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            refusal = err
    if distributed.all_reduce_max(int(refusal is not None)):
        raise refusal or RunDirectoryBusy(f"run.out_dir={cfg.run.out_dir!r}: the main rank could not take its lock")
    return lock

