"""Evaluate a student checkpoint against a privileged teacher, with no training.

    python scripts/eval.py --student runs/default/final [--teacher ID_OR_DIR] [--heldout SOURCE --heldout_split SPLIT]

Without --teacher, a run's final/ export is scored against that run's teacher (from its config.yaml),
and any other model against its own weights behind the privileged prompt.

Writes eval_metrics.json, trace_eval.jsonl and the teacher-trace cache into --out_dir and prints
the teacher-trace gaps and greedy exact match. Takes the same flags as scripts/train.py.
A training run's directory is refused as --out_dir: its trace_eval.jsonl holds the run's own
evaluations. Evaluating into the same directory again replaces the last evaluation's records and
reuses its teacher traces.
"""

import json
import sys
from pathlib import Path

from opd_local.cpu_threads import configure_cpu_threads

configure_cpu_threads()  # before torch is imported: libgomp reads its settings once, when it loads

from opd_local import distributed  # noqa: E402
from opd_local.checkpoint import CHECKPOINTS
from opd_local.cli import run_refusing
from opd_local.config_parsing import parse_config
from opd_local.samplers import make_sampler
from opd_local.evaluation import TRACE_RECORDS, Evaluator, teacher_greedy
from opd_local.metrics import METRICS_FILE
from opd_local.models import load_causal_lm
from opd_local.packing_check import check_run_models
from opd_local.precision import resolve_precision
from opd_local.preflight import check_config, resolve
from opd_local.progress import GroupStream
from opd_local.run_directory import CONFIG_FILE, saved_run_teacher
from opd_local.run_inputs import load_run_inputs
from opd_local.teacher import Teacher


def main() -> None:
    cfg = check_config(parse_config(description=__doc__))
    ctx = distributed.init_distributed(cfg.run.device)
    precision = resolve_precision(cfg.model.dtype, ctx.device, cfg.model.master_dtype)
    print(precision.describe())
    out_dir = Path(cfg.run.out_dir)
    # config.yaml too: a run stopped before its first metrics line is still a run.
    held = next((name for name in (METRICS_FILE, CONFIG_FILE, CHECKPOINTS) if (out_dir / name).exists()), None)
    if held:
        raise ValueError(
            f"--out_dir {out_dir} holds a training run ({held}); scripts/eval.py would write its records "
            f"among the run's own in {TRACE_RECORDS}. Choose another --out_dir, e.g. --out_dir {out_dir / 'eval'}"
        )
    if not cfg.model.teacher:
        # Empty means the student's own starting weights; for a run's final/ export those are the run's
        # starting weights, not the trained ones, so the trained student is never its own teacher.
        cfg.model.teacher = saved_run_teacher(cfg.model.student) or ""
        if cfg.model.teacher:
            print(f"teacher: {cfg.model.teacher}, the teacher of the run that saved {cfg.model.student}")
    resolved = resolve(cfg, ctx.device)
    inputs = load_run_inputs(cfg, resolved)
    out_dir.mkdir(parents=True, exist_ok=True)
    student_path, tokenizer = inputs.student_path, inputs.tokenizer
    first_train = GroupStream(inputs.train_groups, seed=cfg.run.seed, shuffle=cfg.data.shuffle).first_groups(cfg.eval.train_rows)

    student = load_causal_lm(student_path, cfg.model, precision.master, ctx.device)
    teacher = Teacher.build(cfg, inputs, precision, ctx)  # never the evaluated student's base: it is a saved model
    check_run_models(student, teacher, cfg, precision.compute, len(tokenizer), print)  # the layouts scoring may pack
    sampler = make_sampler(cfg, student_path, ctx.device, tokenizer, precision.engine)
    evaluator = Evaluator(
        cfg, out_dir, inputs.heldout_groups, first_train, tokenizer, resolved.micro_batch_tokens,
        compute_dtype=precision.compute,
    )
    evaluator.prepare(teacher_greedy(sampler, teacher, student, tokenizer.eos_token_id, tokenizer.pad_token_id), teacher)
    (out_dir / TRACE_RECORDS).unlink(missing_ok=True)  # the Evaluator appends: one evaluation per directory
    metrics = evaluator.run(0, student, sampler)
    sampler.close()
    teacher.close()
    (out_dir / "eval_metrics.json").write_text(json.dumps({"student": cfg.model.student, "teacher": teacher.name, **metrics}, indent=2))
    width = max(len(k) for k in metrics)
    for key in sorted(metrics):
        print(f"{key:<{width}}  {metrics[key]:.4f}")


if __name__ == "__main__":
    raise SystemExit(run_refusing(main, debug="--debug" in sys.argv))
