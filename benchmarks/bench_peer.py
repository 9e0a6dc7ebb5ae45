"""opd-local's training step against TRL's SDFTTrainer on the same job, in alternating processes.

    python benchmarks/bench_peer.py [--groups 4] [--samples 2] [--max_tokens 128] [--steps 4] [--rounds 2]
                                    [--trl fp32 bf16] [--opd_variant compiled="--rollout.enforce_eager false"]
                                    [--opd_args --sampler hf ...]

The job on both sides: the trainer's default model directory (the embedded SmolLM2), the bundled GSM8K
rows in opd-local's draw order, the same student prompt and privileged teacher prompt token ids (TRL is
fed the chat-rendered text, and every prompt it tokenizes is checked id for id against opd-local's),
`--groups` prompts x `--samples` completions per step, temperature 1 with nothing else shaping the
distribution, at most `--max_tokens` new tokens, full fine-tuning with AdamW (lr 1e-5, betas 0.9/0.95,
no weight decay, gradient clip 1.0), a frozen teacher holding the starting weights, and a sampled-token
reverse-KL objective (TRL: `distillation_mode="sampled_token"`, `teacher_model_kind="base"`).

Each side runs in its own process, one after the other, `--rounds` times (A/B/A/B), so that neither
inherits the other's allocator, threads or page cache; each process runs one warm-up step and then
`--steps` timed ones. Reported per side: s/step (the mean, and the median with p10-p90 over every timed
step), active (completion) tokens per step and per second, the stage split and the peak resident memory
of its processes (and on CUDA their peak allocated memory), under harness.py's header (device, date). opd-local's stages are its own step metrics;
TRL's are timed around its trainer's methods: generation (`_generate`), forward (`compute_loss`: teacher
and student forwards and the loss), backward (`accelerator.backward`), optimizer (clipping and
`optimizer.step`, between the pre- and post-optimizer callbacks) and the rest of the step.

TRL variants (`--trl`): fp32 (fp32 weights and compute, no gradient checkpointing), bf16 (bf16 autocast
over fp32 weights, no gradient checkpointing), defaults (TRL's own: bf16 autocast and gradient
checkpointing). Without trl installed (`pip install -e .[bench]`) only opd-local runs.
`--opd_variant NAME="FLAGS"` (repeatable) adds an opd-local side `opd-local:NAME` run with FLAGS on top of
its defaults, in the same rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # harness.py, also when this file is loaded by path (tests, bench_contention)

from harness import Stats, child_peak_rss_gib, print_header  # noqa: E402

LEARNING_RATE = 1e-5
BETAS = (0.9, 0.95)
# The peer's job on opd-local's side: its sampled-token objective, and every bundled training row
# (the default job trains on 4 rows revisited, which would repeat the same prompts every step).
JOB_FLAGS = ["--loss.objective", "sampled_rkl", "--data.max_train_rows", "0"]
TRL_VARIANTS = {
    "fp32": dict(bf16=False, gradient_checkpointing=False),
    "bf16": dict(bf16=True, gradient_checkpointing=False),
    "defaults": dict(),
}


# ---------------------------------------------------------------- workers (one process each)


def opd_local_worker(job: dict, variant: str = "") -> dict:
    from opd_local.config_parsing import parse_config
    from opd_local.loop import train

    run_dir = Path(job["scratch"]) / f"opd-local-{variant or 'defaults'}"
    argv = [
        "--rollout.groups_per_step", str(job["groups"]), "--rollout.samples_per_group", str(job["samples"]),
        "--rollout.max_tokens", str(job["max_tokens"]), "--rollout.temperature", "1.0",
        "--optim.lr", str(LEARNING_RATE), "--optim.beta1", str(BETAS[0]), "--optim.beta2", str(BETAS[1]),
        "--run.steps", str(job["steps"] + 1), "--eval.every", "0", "--run.save_every", "0",
        "--run.save_final", "false", "--run.out_dir", str(run_dir), "--run.overwrite", "true",
        *JOB_FLAGS, *job["opd_args"], *job["opd_variants"].get(variant, []),
    ]
    train(parse_config(argv, "bench_peer"))
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    timed = [r for r in records if r["step"] >= 1]  # step 0 is the warm-up
    stages = {name: [r[f"time/{name}"] for r in timed] for name in ("sample", "score", "train", "push")}
    return {
        "step_seconds": [r["time/step"] for r in timed],
        "active_tokens": [r["opd/active_tokens"] for r in timed],
        "stages": stages,
    }


# TRL's default template. Its teacher prompt is the student's conversation with the last user turn
# rewritten to `template.format(prompt=that turn, privileged_context=...)`, chat-templated like the student's.
TEACHER_TEMPLATE = "{prompt}\n\n{privileged_context}"


def trl_row(group) -> dict:
    """A conversational row whose student and teacher prompts render to `group`'s two prompts."""
    student, teacher = list(group.row.student_messages), list(group.row.teacher_messages)
    head = TEACHER_TEMPLATE.format(prompt=student[-1]["content"], privileged_context="")
    if student[:-1] != teacher[:-1] or not teacher[-1]["content"].startswith(head) or teacher[-1]["role"] != "user":
        raise AssertionError(f"{group.row.row_id}: the privileged prompt is not TRL's template over the student prompt")
    return {"prompt": student, "privileged_context": teacher[-1]["content"][len(head):]}


def trl_worker(job: dict, variant: str) -> dict:
    import torch
    from datasets import Dataset
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from opd_local.config_parsing import parse_config
    from opd_local.progress import GroupStream
    from opd_local.preflight import check_config, resolve
    from opd_local.run_inputs import load_run_inputs

    cfg = check_config(parse_config([*JOB_FLAGS, *job["opd_args"]], "bench_peer"))
    inputs = load_run_inputs(cfg, resolve(cfg, torch.device("cpu")))
    tokenizer = inputs.tokenizer
    stream = GroupStream(inputs.train_groups, seed=cfg.run.seed, shuffle=cfg.data.shuffle)
    groups = [g for _ in range(job["steps"] + 1) for g in stream.next_groups(job["groups"])]  # opd-local's draw order
    rows = [trl_row(g) for g in groups]
    expected = {tuple(ids) for g in groups for ids in (g.student_prompt_ids, g.teacher_prompt_ids)}

    args = SDFTConfig(
        output_dir=str(Path(job["scratch"]) / f"trl-{variant}"),
        per_device_train_batch_size=job["groups"] * job["samples"],
        gradient_accumulation_steps=1,
        num_generations=job["samples"],
        max_completion_length=job["max_tokens"],
        max_prompt_length=None,
        temperature=1.0, top_k=0, top_p=1.0,
        distillation_mode="sampled_token", distillation_alpha=1.0,  # alpha 1: reverse KL, the only one sampled_token takes
        teacher_model_kind="base",
        teacher_prompt_template=TEACHER_TEMPLATE,
        shuffle_dataset=False,
        learning_rate=LEARNING_RATE, adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=0.0,
        lr_scheduler_type="constant", max_grad_norm=1.0,
        max_steps=job["steps"] + 1,
        model_init_kwargs={"dtype": torch.float32},
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.run.seed,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        **TRL_VARIANTS[variant],
    )
    trainer = SDFTTrainer(model=inputs.student_path, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)

    clock = Clock()
    tokenize = trainer._tokenize_prompts

    checked = []

    def checked_tokenize(prompts):
        ids = tokenize(prompts)
        unexpected = [i for i, p in enumerate(ids) if tuple(p) not in expected]
        if unexpected:
            raise AssertionError(f"TRL tokenized prompt {unexpected[0]} to ids that are not opd-local's")
        checked.extend(tuple(p) for p in ids)
        return ids

    generate = clock.wrap("generate", trainer._generate)

    def counted_generate(prompt_ids):
        prompts, completions = generate(prompt_ids)
        clock.add("active_tokens", sum(len(c) for c in completions))
        return prompts, completions

    trainer._tokenize_prompts = checked_tokenize
    trainer._generate = counted_generate
    trainer.compute_loss = clock.wrap("forward", trainer.compute_loss)
    trainer.accelerator.backward = clock.wrap("backward", trainer.accelerator.backward)
    trainer.add_callback(step_clock_callback(clock))
    trainer.train()
    if set(checked) != expected:  # every student and teacher prompt went through the check
        raise AssertionError("TRL did not tokenize every prompt of the job through the checked path")
    timed = clock.steps[1:]  # the first step is the warm-up
    return {
        "step_seconds": [s["step"] for s in timed],
        "active_tokens": [s["active_tokens"] for s in timed],
        "stages": {
            name: [s.get(name, 0.0) for s in timed] for name in ("generate", "forward", "backward", "optimizer")
        },
        "optimizer": f"{type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, 'optimizer') else trainer.optimizer).__name__} "
        f"({args.optim})",
    }


class Clock:
    """Seconds and counts per training step, accumulated by wrapped methods and closed by the step callback."""

    def __init__(self):
        self.current: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        self.started = self.optimizer_started = 0.0  # perf_counter at the step's and the optimizer's start

    def add(self, name: str, value: float) -> None:
        self.current[name] = self.current.get(name, 0.0) + value

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - start)

        return timed


def step_clock_callback(clock: Clock):
    """A TrainerCallback that times each optimizer step, and the optimizer within it, into `clock`."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.current = {}
            clock.started = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            clock.optimizer_started = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            clock.add("optimizer", time.perf_counter() - clock.optimizer_started)

        def on_step_end(self, args, state, control, **kwargs):
            clock.current["step"] = time.perf_counter() - clock.started
            clock.steps.append(clock.current)

    return StepClock()


# ---------------------------------------------------------------- driver


def run_worker(side: str, job: dict, scratch: Path) -> dict:
    """`side` in its own process; its result, with the peak resident memory of that process."""
    job_path, result_path, log_path = (scratch / f"{side}.{suffix}" for suffix in ("job.json", "result.json", "log"))
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCH_DIR.parent), os.environ.get("PYTHONPATH", "")]),
               TRL_EXPERIMENTAL_SILENCE="1")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, __file__, "--worker", side, "--job", str(job_path), "--result", str(result_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{side} failed (log {log_path}):\n{tail}")
    result = json.loads(result_path.read_text())
    result["peak_rss_gib"] = child_peak_rss_gib(usage)
    return result


def summarize(results: list[dict]) -> dict:
    """Pooled over rounds: total tokens over total seconds, and the mean seconds of each stage per step."""
    seconds = [s for r in results for s in r["step_seconds"]]
    tokens = [t for r in results for t in r["active_tokens"]]
    step = Stats.of(seconds, warmup=1)  # one warm-up step per process
    stages = {name: statistics.fmean(v for r in results for v in r["stages"][name]) for name in results[0]["stages"]}
    # Cost per token: a straight line through (active tokens, seconds) of every timed step; the steps'
    # lengths vary with sampling, which is what spreads the points.
    fit = statistics.linear_regression(tokens, seconds) if len(set(tokens)) > 1 else None
    return {
        "fixed_s": fit.intercept if fit else float("nan"),
        "ms_per_token": fit.slope * 1e3 if fit else float("nan"),
        "s_per_step": statistics.fmean(seconds),
        "step_stats": step,
        "tokens_per_step": statistics.fmean(tokens),
        "tokens_per_s": sum(tokens) / sum(seconds),
        "per_round_tokens_per_s": [sum(r["active_tokens"]) / sum(r["step_seconds"]) for r in results],
        "stages": stages,
        "peak_rss_gib": max(r["peak_rss_gib"] for r in results),
        "peak_cuda_gib": max(r.get("peak_cuda_gib", 0.0) for r in results),
        "steps": len(seconds),
        "optimizer": results[0].get("optimizer", ""),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=4, help="prompts per step")
    parser.add_argument("--samples", type=int, default=2, help="completions per prompt")
    parser.add_argument("--max_tokens", type=int, default=128, help="completion length cap")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process, after one warm-up step")
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds: one process per side per round")
    parser.add_argument("--trl", nargs="*", default=["fp32", "bf16"], choices=sorted(TRL_VARIANTS), help="TRL variants")
    parser.add_argument("--opd_variant", action="append", default=[], metavar='NAME="FLAGS"',
                        help="another opd-local side with these flags added (repeatable)")
    parser.add_argument("--opd_args", nargs=argparse.REMAINDER, default=[], help="extra opd-local flags, e.g. --sampler hf")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        job = json.loads(Path(args.job).read_text())
        if args.worker.startswith("opd-local"):
            result = opd_local_worker(job, args.worker.partition(":")[2])
        else:
            result = trl_worker(job, args.worker.removeprefix("trl-"))
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            result["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
        Path(args.result).write_text(json.dumps(result))
        return

    variants = dict(_variant(spec) for spec in args.opd_variant)
    sides = ["opd-local", *(f"opd-local:{name}" for name in variants)]
    if importlib.util.find_spec("trl") is None:
        print("trl is not installed: running opd-local alone (pip install -e .[bench] for the TRL SDFTTrainer side)")
    else:
        sides += [f"trl-{v}" for v in args.trl]
    print_job_header(args)
    results: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="bench_peer-") as tmp:
        job = dict(groups=args.groups, samples=args.samples, max_tokens=args.max_tokens, steps=args.steps,
                   opd_args=args.opd_args, opd_variants=variants, scratch=tmp)
        for round_index in range(args.rounds):
            for side in sides:
                start = time.perf_counter()
                results[side].append(run_worker(side, job, Path(tmp)))
                print(f"round {round_index + 1}/{args.rounds} {side}: {time.perf_counter() - start:.0f} s", flush=True)
    report(args, {side: summarize(r) for side, r in results.items()})


def print_job_header(args) -> None:
    """harness.py's header (device, date, command, versions), the job, and how each column is measured."""
    import torch
    import transformers

    trl_version = ""
    if importlib.util.find_spec("trl") is not None:
        import trl

        trl_version = f", trl {trl.__version__}"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print_header("bench_peer", device, [
        f"transformers {transformers.__version__}{trl_version}",
        f"job: {args.groups} prompts x {args.samples} completions, max_tokens {args.max_tokens}, AdamW lr {LEARNING_RATE}; "
        f"{args.rounds} round(s) x {args.steps} timed steps per side after one warm-up step; opd-local flags: "
        f"{' '.join([*JOB_FLAGS, *args.opd_args])} (the rest defaults)",
        "s/step: the mean; median and p10-p90 over every timed step of every round; RSS GiB: the peak resident set "
        "of the side's processes" + (", CUDA GiB: their peak allocated" if device == "cuda" else ""),
    ])


def report(args, summary: dict[str, dict]) -> None:
    import torch

    cuda = torch.cuda.is_available()
    cuda_column = f"{'CUDA GiB':>9}" if cuda else ""
    print(f"{'side':<20}{'s/step':>8}{'median':>8}{'p10-p90':>12}{'tok/step':>10}{'tok/s':>8}{'RSS GiB':>9}"
          f"{cuda_column}  stages (s/step)")
    for side, s in summary.items():
        stages = ", ".join(f"{name} {value:.2f}" for name, value in s["stages"].items())
        rounds = "/".join(f"{v:.1f}" for v in s["per_round_tokens_per_s"])
        step = s["step_stats"]
        print(f"{side:<20}{s['s_per_step']:>8.2f}{step.median:>8.2f}{step.spread(spec='.2f'):>12}"
              f"{s['tokens_per_step']:>10.0f}{s['tokens_per_s']:>8.1f}{s['peak_rss_gib']:>9.2f}"
              f"{format(s['peak_cuda_gib'], '>9.2f') if cuda else ''}  "
              f"{stages}; tok/s by round {rounds}; fit {s['fixed_s']:.1f} s + {s['ms_per_token']:.1f} ms/token"
              f"{'; ' + s['optimizer'] if s['optimizer'] else ''}")
    for spec in args.opd_variant:
        name, flags = _variant(spec)
        print(f"opd-local:{name}: the defaults plus {' '.join(flags)}")
    trl_sides = [side for side in summary if side.startswith("trl-")]
    if trl_sides:
        best = max(trl_sides, key=lambda side: summary[side]["tokens_per_s"])
        for side in (side for side in summary if side.startswith("opd-local")):
            ratio = summary[side]["tokens_per_s"] / summary[best]["tokens_per_s"]
            print(f"{side} / {best} (the fastest TRL variant): {ratio:.2f}x active tokens/s")


def _variant(spec: str) -> tuple[str, list[str]]:
    name, sep, flags = spec.partition("=")
    if not sep or not name.isidentifier():
        raise SystemExit(f'--opd_variant {spec!r}: expected NAME="FLAGS", e.g. compiled="--rollout.enforce_eager false"')
    return name, shlex.split(flags)


if __name__ == "__main__":
    main()
