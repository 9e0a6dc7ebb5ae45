"""Every bad flag, config file, data file, model path and checkpoint is refused on one line, touching nothing.

Each case runs scripts/train.py's entry point in process with a directory that already holds a
finished run as its run directory (a new run passes --overwrite, so that the bad input is what is
refused), then checks the exit code, that stderr has one `error:` line naming the bad thing, and
that the run directory is byte-identical afterwards. The same holds for what fails once the run has
started (divergence, a full disk, Ctrl-C): the overwritten run is put back as it was.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import resource
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from opd_local.cli import EXIT_INTERRUPTED, EXIT_REFUSED, train_main
from opd_local.config_parsing import build_arg_parser
from opd_local.run_lock import LOCK_FILE

GOOD = {"question": "Sam has 2 cats and gets 3 more. How many cats?", "answer": "2 + 3 = 5\n#### 5"}
GOOD_MESSAGES = {
    "messages": [{"role": "user", "content": "What is 6 * 7?"}],
    "teacher_messages": [{"role": "user", "content": "What is 6 * 7?\nHint: 6 * 7 = 42.\nEnd with `Final: 42`."}],
    "answer": "42",
    "privileged": "Hint: 6 * 7 = 42.",
}


def jsonl(*rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def messages_row(**changes) -> dict:
    return {**GOOD_MESSAGES, **changes}


def base_args(model: str, out: Path, *extra: str) -> list[str]:
    """A short run on the micro model, then `extra`; a setting `extra` gives replaces the base flag, as
    a flag given twice is refused."""
    base = [
        "--student", model, "--sampler", "hf", "--out_dir", str(out), "--steps", "2", "--groups_per_step", "2",
        "--samples_per_group", "2", "--max_tokens", "6", "--max_train_rows", "8", "--max_heldout_rows", "2",
        "--eval.every", "0", "--save_final", "false",
    ]
    flags = build_arg_parser("opd-local")._option_string_actions
    given = {flags[a].dest for a in extra if a in flags}
    kept = [a for flag, value in zip(base[::2], base[1::2]) if flags[flag].dest not in given for a in (flag, value)]
    return kept + list(extra)


@pytest.fixture(scope="module")
def finished_run(micro_model_dir, tmp_path_factory) -> Path:
    """A run of 2 steps with a checkpoint after each, trained on a local file."""
    root = tmp_path_factory.mktemp("finished")
    rows = [json.loads(line) for line in Path("opd_local/bundled/gsm8k/train.jsonl").read_text().splitlines()[:8]]
    (root / "train.jsonl").write_text(jsonl(*rows))
    out = root / "run"
    assert train_main(base_args(micro_model_dir, out, "--train", str(root / "train.jsonl"), "--save_every", "1")) == 0
    return out


def snapshot(folder: Path) -> dict[str, tuple]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mode, hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


# ---------------------------------------------------------------- damage done to a copied run


def truncate(name: str, keep: int = 100):
    def damage(run: Path):
        for checkpoint in (run / "checkpoints").glob("step-*"):
            path = checkpoint / name
            path.write_bytes(path.read_bytes()[:keep])
    return damage


def write_in_checkpoints(name: str, text: str):
    def damage(run: Path):
        for checkpoint in (run / "checkpoints").glob("step-*"):
            (checkpoint / name).write_text(text)
    return damage


def edit_progress_step(run: Path):
    for checkpoint in (run / "checkpoints").glob("step-*"):
        path = checkpoint / "progress.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "step": 7}))


def remove_in_checkpoints(name: str):
    def damage(run: Path):
        for checkpoint in (run / "checkpoints").glob("step-*"):
            (checkpoint / name).unlink()
    return damage


def remove_checkpoints(run: Path):
    shutil.rmtree(run / "checkpoints")


def edit_training_rows(run: Path):
    """The same file, path and row count (so the same row ids), one row's content changed; undone after the case."""
    path = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["train"])
    text = path.read_text()
    lines = text.splitlines()
    row = json.loads(lines[3])
    lines[3] = json.dumps({**row, "question": row["question"].replace("?", " exactly?")})
    path.write_text("\n".join(lines) + "\n")
    return lambda: path.write_text(text)


def break_saved_config(run: Path):
    (run / "config.yaml").write_text("run:\n  steps: [2\n")


# ---------------------------------------------------------------- models built from the micro model


def held_by_another_run(run: Path):
    """The run directory's lock, held as a live run holds it (flock conflicts between open files, in one process too)."""
    fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, json.dumps({"pid": 4242, "host": "trainer-7", "started": "2026-12-07T10:00:00+0000"}).encode())
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return lambda: os.close(fd)


def cut_metrics_line(run: Path):
    """The last metrics line half written."""
    path = run / "metrics.jsonl"
    text = path.read_text()
    path.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])


def _model_copy(model: str, target: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(model, target)
    for name in drop:
        (target / name).unlink(missing_ok=True)
    return target


def without_chat_template(tmp: Path, model: str) -> None:
    folder = _model_copy(model, tmp / "no-template", drop=("chat_template.jinja",))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def without_tokenizer_files(tmp: Path, model: str) -> None:
    keep = ("config.json", "generation_config.json", "model.safetensors")
    _model_copy(model, tmp / "no-tokenizer", drop=tuple(p.name for p in Path(model).iterdir() if p.name not in keep))


def with_strict_template(tmp: Path, model: str) -> None:
    """A template that, like Mistral's, raises on a system turn."""
    folder = _model_copy(model, tmp / "strict", drop=("chat_template.jinja",))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System turns are not supported') }}"
        "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


# Templates that render no system turn, as some models' do: a hint given in one never reaches the prompt.
SKIPS_SYSTEM = (
    "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
# ...and one that writes a default system turn where the messages give none, and drops a given one.
REPLACES_SYSTEM = "{% if messages[0]['role'] != 'system' %}system: You are helpful.\\n{% endif %}" + SKIPS_SYSTEM


def with_template(name: str, template: str):
    def build(tmp: Path, model: str) -> None:
        folder = _model_copy(model, tmp / name, drop=("chat_template.jinja",))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return build


def with_vocabulary_rows(rows: int):
    """A teacher with the micro model's tokenizer but embeddings and an lm_head of `rows` rows."""
    def build(tmp: Path, model: str) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model)
        config.vocab_size = rows
        folder = _model_copy(model, tmp / f"rows-{rows}")
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return build


def with_padded_vocabulary(tmp: Path, model: str) -> None:
    """The same tokenizer, the output head 64 rows wider (as Qwen2.5's sizes differ between checkpoints)."""
    from transformers import AutoModelForCausalLM

    padded = AutoModelForCausalLM.from_pretrained(model)
    padded.resize_token_embeddings(padded.config.vocab_size + 64)
    folder = _model_copy(model, tmp / "padded")
    padded.save_pretrained(folder)


def with_truncated_weights(tmp: Path, model: str) -> None:
    weights = _model_copy(model, tmp / "cut") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def interrupt_at_step(step: int):
    """Ctrl-C while step `step` builds its rollouts (KeyboardInterrupt is what SIGINT raises in the main thread)."""
    def inject(monkeypatch):
        import opd_local.loop

        calls = []
        build = opd_local.loop.build_rollouts

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) > step:
                raise KeyboardInterrupt
            return build(*args, **kwargs)

        monkeypatch.setattr(opd_local.loop, "build_rollouts", interrupted)
    return inject


def model_file_size(model: str) -> int:
    return (Path(model) / "model.safetensors").stat().st_size


def empty_saved_config(run: Path):
    (run / "config.yaml").write_text("")


def break_first_metrics_line(run: Path):
    """A line cut short that is not the last: not what a crash while appending leaves."""
    path = run / "metrics.jsonl"
    path.write_text('{"step": 0, "lo\n' + path.read_text())


def with_context(tokens: int):
    def build(tmp: Path, model: str) -> None:
        folder = _model_copy(model, tmp / "short")
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": tokens}))
    return build


def with_unknown_logit_transform(tmp: Path, model: str) -> None:
    """A teacher whose config names a logit transform on an architecture whose use of it opd-local does not know."""
    folder = _model_copy(model, tmp / "scaled")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "logit_scale": 4.0}))


def alias_bomb(key: str = "sync:\n  probe_text") -> str:
    """The "billion laughs": 9 levels of 9 aliases each: 9**9 values from a few hundred bytes."""
    lines = ['  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "x-bomb:\n" + "\n".join(lines) + f"\n{key}: *l8\n"


@dataclass
class Case:
    id: str
    args: list[str]  # after the base flags; "{tmp}", "{run}" and "{model}" are filled in
    expect: str  # in the one error line, with the same fields filled in
    files: dict[str, str | bytes] = field(default_factory=dict)  # written under {tmp} first; "name/" is an empty folder
    build: object = None  # (tmp, micro model dir) -> None: builds a model folder under {tmp}
    resume: bool = False  # no base flags: the args continue {run} (those that give --resume themselves, their own)
    overwrite: bool = True
    damage: object = None  # done to the copied run before the snapshot; may return its undo
    marks: tuple = ()
    code: int = EXIT_REFUSED
    inject: object = None  # (monkeypatch) -> None: a fault inside the run
    file_size_limit: object = None  # (micro model dir) -> bytes: RLIMIT_FSIZE while the run writes


NO_WANDB = (pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed"),)

CASES = [
    # ---- flags: ranges, exact choices, types
    Case("samples-per-group-0", ["--samples_per_group", "0"], "--rollout.samples_per_group: 0 must be at least 1"),
    Case("groups-per-step-negative", ["--groups_per_step", "-1"], "--rollout.groups_per_step: -1 must be at least 1"),
    Case("steps-0", ["--steps", "0"], "--run.steps: 0 must be at least 1"),
    Case("device-gpu", ["--device", "gpu"], "--run.device: 'gpu' is not one of auto, cpu, cuda"),
    Case("device-upper-case", ["--device", "CPU"], "--run.device: 'CPU' is not one of"),
    Case("sampler-upper-case", ["--sampler", "VLLM"], "--rollout.sampler: 'VLLM' is not one of"),
    Case("objective-unknown", ["--objective", "rkl"], "--loss.objective: 'rkl' is not one of"),
    Case("normalize-plural", ["--normalize", "tokens"], "--loss.normalize: 'tokens' is not one of"),
    Case("teacher-context-capitalised", ["--teacher_context", "Privileged"], "--model.teacher_context: 'Privileged'"),
    Case("teacher-weights-unknown", ["--teacher_weights", "frozen"], "--model.teacher_weights: 'frozen'"),
    Case("teacher-placement-unknown", ["--teacher_placement", "gpu"], "--model.teacher_placement: 'gpu'"),
    Case("parallel-unknown", ["--parallel", "zero"], "--run.parallel: 'zero'"),
    Case("format-unknown", ["--format", "csv"], "--data.format: 'csv'"),
    Case("attention-unknown", ["--attn_implementation", "flash"], "--model.attn_implementation: 'flash'"),
    Case("enforce-eager-yes", ["--enforce_eager", "yes"], "--rollout.enforce_eager: 'yes'"),
    Case("temperature-0", ["--temperature", "0"], "--rollout.temperature: 0.0 must be at least 0.01"),
    Case("temperature-below-floor", ["--temperature", "1e-9"], "--rollout.temperature: 1e-09 must be at least 0.01"),
    Case("temperature-nan", ["--temperature", "nan"], "--rollout.temperature: expected a finite number"),
    Case("lr-0", ["--lr", "0"], "--optim.lr: 0.0 must be above 0"),
    Case("lr-negative", ["--lr", "-0.0001"], "--optim.lr: -0.0001 must be above 0"),
    Case("lr-word", ["--lr", "fast"], "--optim.lr: expected a number, got 'fast'"),
    Case("beta1-1", ["--beta1", "1.0"], "--optim.beta1: 1.0 must be below 1"),
    Case("beta2-above-1", ["--beta2", "1.5"], "--optim.beta2: 1.5 must be below 1"),
    Case("eps-0", ["--eps", "0"], "--optim.eps: 0.0 must be above 0"),
    Case("grad-clip-negative", ["--grad_clip", "-1"], "--optim.grad_clip: -1.0 must be at least 0"),
    Case("weight-decay-negative", ["--weight_decay", "-0.1"], "--optim.weight_decay"),
    Case("warmup-negative", ["--warmup_steps", "-1"], "--optim.warmup_steps: -1 must be at least 0"),
    Case("max-tokens-0", ["--max_tokens", "0"], "--rollout.max_tokens: 0 must be at least 1"),
    Case("max-tokens-fraction", ["--max_tokens", "2.5"], "--rollout.max_tokens: expected an integer, got '2.5'"),
    Case("gpu-memory-above-1", ["--gpu_memory_utilization", "1.5"], "--rollout.gpu_memory_utilization: 1.5 must be at most 1"),
    Case("kv-cache-0", ["--kv_cache_gib", "0"], "--rollout.kv_cache_gib"),
    Case("jsd-beta-1", ["--jsd_beta", "1"], "--loss.jsd_beta: 1.0 must be below 1"),
    Case("topk-0", ["--topk", "0"], "--loss.topk"),
    Case("chunk-tokens-0", ["--chunk_tokens", "0"], "--loss.chunk_tokens"),
    Case("kl-coef-0", ["--kl_coef", "0"], "--loss.kl_coef"),
    Case("log-ratio-cap-negative", ["--log_ratio_cap", "-2"], "--loss.log_ratio_cap"),
    Case("dtype-float16", ["--dtype", "float16"], "--model.dtype: 'float16' is not one of auto, float32, fp32, bfloat16, bf16"),
    Case("dtype-not-exact", ["--dtype", "BF16"], "--model.dtype: 'BF16'"),
    Case("master-dtype-auto", ["--master_dtype", "auto"], "--model.master_dtype: 'auto'"),
    Case("parity-threshold-negative", ["--parity_threshold", "-0.1"], "--sync.parity_threshold: -0.1 must be at least 0"),
    Case("eval-every-negative", ["--eval.every", "-1"], "--eval.every"),
    Case("keep-checkpoints-negative", ["--keep_checkpoints", "-1"], "--run.keep_checkpoints"),
    Case("save-every-negative", ["--save_every", "-2"], "--run.save_every"),
    Case("lora-rank-negative", ["--lora_rank", "-4"], "--model.lora_rank"),
    Case("lora-dropout-1", ["--lora_dropout", "1.0"], "--model.lora_dropout: 1.0 must be below 1"),
    Case("max-prompt-tokens-0", ["--max_prompt_tokens", "0"], "--data.max_prompt_tokens"),
    Case("seed-negative", ["--seed", "-1"], "--run.seed"),
    Case("seed-past-64-bits", ["--seed", "1180591620717411303424", "--lora_rank", "4"],
         "--run.seed: 1180591620717411303424 must be at most 4294967295"),
    Case("seed-2-to-the-32", ["--seed", "4294967296"], "--run.seed: 4294967296 must be at most 4294967295"),
    Case("shuffle-maybe", ["--shuffle", "maybe"], "--data.shuffle: expected true or false, got 'maybe'"),
    Case("unknown-flag", ["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1"),
    Case("flag-without-value", ["--lr"], "argument --optim.lr/--lr: expected one argument"),
    # ---- one rule for repeats: a flag given twice, as a YAML key given twice, is refused
    Case("flag-twice", ["--max_tokens", "8", "--max_tokens", "12"], "command line: --rollout.max_tokens is given twice (8, then 12)"),
    Case("flag-twice-two-spellings", ["--optim.lr", "1e-4", "--lr", "5e-4"],
         "command line: --optim.lr is given twice (--optim.lr 1e-4, then --lr 5e-4)"),
    Case("bool-flag-twice", ["--drop_overlong", "false", "--drop_overlong"],
         "command line: --data.drop_overlong is given twice (false, then true)"),
    Case("out-dir-empty", ["--out_dir", ""], "--run.out_dir: must not be empty"),
    Case("train-path-empty", ["--train", ""], "--data.train: must not be empty"),
    Case("student-empty", ["--student", ""], "--model.student: must not be empty"),
    Case("probe-text-empty", ["--probe_text", ""], "--sync.probe_text: must not be empty"),
    # ---- rules between settings, and what the machine lacks
    Case("context-too-long", ["--max_model_len", "256"], "exceeds rollout.max_model_len=256"),
    Case("separate-without-teacher", ["--teacher_weights", "separate"], "model.teacher_weights=separate needs model.teacher"),
    Case("adapter-off-without-lora", ["--teacher_weights", "base_adapter_off"], "needs a LoRA student"),
    Case("initial-with-teacher", ["--teacher_weights", "initial", "--teacher", "{model}"], "but model.teacher is set"),
    Case("teacher-on-cpu-without-gpu", ["--teacher_placement", "cpu", "--device", "cpu"], "model.teacher_placement=cpu"),
    Case("wandb-missing", ["--wandb", "true"], "run.wandb is on but wandb is not installed", marks=NO_WANDB),
    # ---- config files
    Case("yaml-float-for-int", ["--config", "{tmp}/c.yaml"], "{tmp}/c.yaml: run.steps: expected an integer, got 2.5",
         files={"c.yaml": "run:\n  steps: 2.5\n"}),
    Case("yaml-null", ["--config", "{tmp}/c.yaml"], "{tmp}/c.yaml: model.student: expected text, got null",
         files={"c.yaml": "model:\n  student: null\n"}),
    Case("yaml-bool-for-int", ["--config", "{tmp}/c.yaml"], "run.steps: expected an integer, got True",
         files={"c.yaml": "run:\n  steps: true\n"}),
    Case("yaml-unknown-section", ["--config", "{tmp}/c.yaml"], "unknown config section 'trainer'", files={"c.yaml": "trainer:\n  steps: 2\n"}),
    Case("yaml-unknown-key", ["--config", "{tmp}/c.yaml"], "unknown key run.stepz", files={"c.yaml": "run:\n  stepz: 2\n"}),
    Case("yaml-section-not-mapping", ["--config", "{tmp}/c.yaml"], "section 'rollout' must be a mapping", files={"c.yaml": "rollout: 3\n"}),
    Case("yaml-not-mapping", ["--config", "{tmp}/c.yaml"], "must be a mapping of sections, got list", files={"c.yaml": "- run\n- steps\n"}),
    Case("yaml-syntax", ["--config", "{tmp}/c.yaml"], "{tmp}/c.yaml:3: not valid YAML", files={"c.yaml": "run:\n  steps: [2\n"}),
    Case("yaml-missing", ["--config", "{tmp}/missing.yaml"], "{tmp}/missing.yaml: cannot read the config file"),
    Case("yaml-key-twice", ["--config", "{tmp}/c.yaml"], "{tmp}/c.yaml:3: not valid YAML (key 'steps' is given twice (first on line 2))",
         files={"c.yaml": "run:\n  steps: 5\n  steps: 500\n"}),
    Case("yaml-section-twice", ["--config", "{tmp}/c.yaml"], "key 'rollout' is given twice (first on line 1)",
         files={"c.yaml": "rollout:\n  max_tokens: 8\nrollout:\n  temperature: 0.5\n"}),
    Case("yaml-number-past-float", ["--config", "{tmp}/c.yaml"], "optim.lr: expected a finite number, got 99999",
         files={"c.yaml": "optim:\n  lr: " + "9" * 400 + "\n"}),
    Case("flag-abbreviated", ["--temp", "0.5"], "unrecognized arguments: --temp 0.5"),
    Case("yaml-alias-bomb", ["--config", "{tmp}/c.yaml"],
         "{tmp}/c.yaml: its aliases expand to more than 10000 values; a config needs far fewer (an alias bomb?)",
         files={"c.yaml": alias_bomb()}),
    Case("yaml-alias-cycle", ["--config", "{tmp}/c.yaml"], "{tmp}/c.yaml: its aliases expand to more than 10000 values",
         files={"c.yaml": "sync:\n  probe_text: &a [*a]\n"}),
    Case("yaml-long-value-shortened", ["--config", "{tmp}/c.yaml"],
         "{tmp}/c.yaml: sync.probe_text: expected text, got ['lol', 'lol', 'lol', 'lol', 'lol', 'lol... (7000 characters)",
         files={"c.yaml": "sync:\n  probe_text: [" + ", ".join(["lol"] * 1000) + "]\n"}),
    Case("yaml-utf16", ["--config", "{tmp}/c.yaml"], "{tmp}/c.yaml: not UTF-8 text (UTF-16, by its byte-order mark",
         files={"c.yaml": "run:\n  steps: 2\n".encode("utf-16")}),
    Case("yaml-latin1", ["--config", "{tmp}/c.yaml"], "{tmp}/c.yaml: not UTF-8 text (byte 0xe9 on line 2",
         files={"c.yaml": "sync:\n  probe_text: Caf\u00e9 sells 2 cakes.\n".encode("latin-1")}),
    # a later --config overrides an earlier one key by key; neither is dropped
    Case("config-twice-both-apply", ["--config", "{tmp}/a.yaml", "--config", "{tmp}/b.yaml"], "exceeds rollout.max_model_len=256",
         files={"a.yaml": "rollout:\n  max_model_len: 256\n", "b.yaml": "run:\n  steps: 2\n"}),
    Case("config-twice-later-wins", ["--config", "{tmp}/a.yaml", "--config", "{tmp}/b.yaml"], "exceeds rollout.max_model_len=200",
         files={"a.yaml": "rollout:\n  max_model_len: 256\n", "b.yaml": "rollout:\n  max_model_len: 200\n"}),
    Case("config-twice-second-bad", ["--config", "{tmp}/a.yaml", "--config", "{tmp}/b.yaml"], "{tmp}/b.yaml: run.steps: 0 must be at least 1",
         files={"a.yaml": "run:\n  steps: 2\n", "b.yaml": "run:\n  steps: 0\n"}),
    # ---- the run directory
    Case("run-dir-holds-a-run", [], "already holds a run (config.yaml); pass --overwrite", overwrite=False),
    Case("run-dir-is-a-file", ["--out_dir", "{tmp}/afile"], "run.out_dir='{tmp}/afile' is a file", files={"afile": "x"}),
    Case("run-dir-in-use", [], "run.out_dir='{run}' is in use by pid 4242 on host trainer-7 (since 2026-12-07T10:00:00+0000)",
         damage=held_by_another_run),
    # ---- what fails once the run has started: the overwritten run comes back as it was
    Case("diverged-every-step-skipped", ["--skip_grad_norm", "1e-12", "--max_skipped_steps", "2"],
         "training diverged: steps 0-1 were skipped, each for a non-finite or absurd loss or gradient norm"),
    Case("diverged-weights-not-finite", ["--lr", "1e30"], "its weights hold inf or NaN (after an update, training diverged"),
    Case("disk-full-weights", ["--save_every", "1"], "cannot write the checkpoint of step 1 to {run}/checkpoints/step-000001: a file-size limit",
         file_size_limit=lambda model: model_file_size(model) // 2),
    Case("disk-full-optimizer", ["--save_every", "1"], "cannot write the checkpoint of step 1 to {run}/checkpoints/step-000001: the write stopped short",
         file_size_limit=lambda model: model_file_size(model) + 65536),
    Case("interrupted-before-it-stood", [], "interrupted at step 1, before the new run's first checkpoint; {run} holds the run it replaced, as it was",
         code=EXIT_INTERRUPTED, inject=interrupt_at_step(1)),
    # ---- resume
    Case("resume-into-a-running-run", [], "run.out_dir='{run}' is in use by pid 4242", resume=True, damage=held_by_another_run),
    Case("resume-not-a-run", ["--resume", "{tmp}"], "--resume {tmp}: no config.yaml there", resume=True),
    Case("resume-no-checkpoint", [], "holds no checkpoint yet", resume=True, damage=remove_checkpoints),
    Case("resume-other-student", ["--student", "{tmp}"], "--model.student", resume=True),
    Case("resume-other-seed", ["--seed", "5"], "--run.seed 5 differs from the run's 0", resume=True),
    Case("resume-other-rows", ["--max_train_rows", "4"], "--data.max_train_rows 4 differs from the run's 8", resume=True),
    Case("resume-lora-added", ["--lora_rank", "4"], "--model.lora_rank 4 differs", resume=True),
    Case("resume-steps-behind", ["--steps", "1"], "below the step of the checkpoint resumed from (step-000002)", resume=True),
    Case("resume-elsewhere", ["--out_dir", "{tmp}/elsewhere"], "differs from run.resume", resume=True),
    Case("resume-and-overwrite", ["--overwrite"], "give one of them", resume=True),
    Case("resume-bad-flag", ["--lr", "0"], "--optim.lr: 0.0 must be above 0", resume=True),
    Case("resume-twice", ["--resume", "{run}", "--resume", "{tmp}"], "command line: --run.resume is given twice ({run}, then {tmp})",
         resume=True),
    Case("resume-flag-twice", ["--lr", "1e-3", "--lr", "2e-3"], "command line: --optim.lr is given twice (1e-3, then 2e-3)", resume=True),
    Case("resume-config-other-seed", ["--config", "{tmp}/c.yaml"], "--run.seed 5 differs from the run's 0", resume=True,
         files={"c.yaml": "run:\n  seed: 5\n"}),
    Case("resume-edited-step", [], "step-000002/progress.json: says step 7 but sits in step-000002", resume=True, damage=edit_progress_step),
    Case("resume-progress-not-json", [], "step-000002/progress.json: unreadable", resume=True, damage=write_in_checkpoints("progress.json", "{")),
    Case("resume-weights-truncated", [], "step-000002/model.safetensors: truncated", resume=True, damage=truncate("model.safetensors")),
    Case("resume-optimizer-damaged", [], "step-000002/optimizer.pt: damaged", resume=True, damage=truncate("optimizer.pt", 5000)),
    Case("resume-rng-missing", [], "step-000002/rng_rank0.pt: missing", resume=True, damage=remove_in_checkpoints("rng_rank0.pt")),
    Case("resume-rows-edited", [], "the training rows (ids or content) differ", resume=True, damage=edit_training_rows),
    Case("resume-config-broken", [], "config.yaml:3: not valid YAML", resume=True, damage=break_saved_config),
    Case("resume-config-empty", [], "config.yaml: the run's saved config is empty", resume=True, damage=empty_saved_config),
    Case("resume-metrics-line-broken", [], "metrics.jsonl:1: not a JSON record", resume=True, damage=break_first_metrics_line),
    # ---- data files
    Case("data-empty-file", ["--train", "{tmp}/e.jsonl"], "{tmp}/e.jsonl: the file is empty", files={"e.jsonl": ""}),
    Case("data-not-json", ["--train", "{tmp}/p.jsonl"], "{tmp}/p.jsonl: line 1: not valid JSON", files={"p.jsonl": "question,answer\n"}),
    Case("data-truncated-last-line", ["--train", "{tmp}/t.jsonl"], "{tmp}/t.jsonl: line 3: not valid JSON",
         files={"t.jsonl": jsonl(GOOD, {**GOOD, "question": "Q2?"}) + json.dumps(GOOD)[:25]}),
    Case("data-csv", ["--train", "{tmp}/r.csv"], "{tmp}/r.csv: unsupported file type '.csv'", files={"r.csv": "question,answer\n"}),
    Case("data-missing-file", ["--train", "{tmp}/missing.jsonl"], "{tmp}/missing.jsonl: no such file or directory"),
    Case("data-missing-folder", ["--heldout", "{tmp}/nowhere"], "{tmp}/nowhere: no such file or directory"),
    Case("data-mixed-types", ["--train", "{tmp}/m.jsonl"], "{tmp}/m.jsonl#2: field 'answer' must be a string, got int",
         files={"m.jsonl": jsonl(GOOD_MESSAGES, messages_row(answer="7", messages=[{"role": "user", "content": "3+4?"}]), messages_row(answer=42))}),
    Case("data-missing-field", ["--train", "{tmp}/r.jsonl"], "{tmp}/r.jsonl#1: field 'answer' is missing",
         files={"r.jsonl": jsonl(GOOD, {"question": "Q?"})}),
    Case("data-leak-reworded", ["--train", "{tmp}/l.jsonl"], "{tmp}/l.jsonl#0: field 'messages[0].content' contains the privileged text",
         files={"l.jsonl": jsonl(messages_row(messages=[{"role": "user", "content": "What is 6*7? HINT 6 * 7 = 42"}]))}),
    Case("data-leak-answer-in-prose", ["--train", "{tmp}/l.jsonl"], "{tmp}/l.jsonl#0: field 'messages[0].content' states the final answer",
         files={"l.jsonl": jsonl(messages_row(messages=[{"role": "user", "content": "What is 6*7? The answer is 42."}]))}),
    Case("data-nothing-privileged", ["--train", "{tmp}/s.jsonl"], "{tmp}/s.jsonl#0: field 'teacher_messages' adds nothing",
         files={"s.jsonl": jsonl(messages_row(teacher_messages=GOOD_MESSAGES["messages"], privileged=None, answer=None))}),
    Case("data-heldout-overlaps", ["--train", "{tmp}/r.jsonl", "--heldout", "{tmp}/r.jsonl"], "held-out rows must never be trained on",
         files={"r.jsonl": jsonl(GOOD)}),
    Case("data-overlong", ["--max_prompt_tokens", "60"], "bundled:gsm8k/train#0: field 'messages' is over data.max_prompt_tokens=60"),
    Case("data-bad-parquet", ["--heldout", "{tmp}/b.parquet"], "{tmp}/b.parquet: cannot be read as .parquet", files={"b.parquet": "nope"}),
    Case("data-wrong-format", ["--train", "{tmp}/r.jsonl", "--format", "gsm8k"], "{tmp}/r.jsonl#0: field 'question' is missing",
         files={"r.jsonl": jsonl(GOOD_MESSAGES)}),
    Case("data-unknown-bundled", ["--train", "bundled:nope"], "bundled:nope: unknown bundled data"),
    Case("data-unknown-split", ["--train_split", "nosuch"], "unknown bundled data or split 'nosuch'"),
    Case("data-row-not-object", ["--train", "{tmp}/a.json"], "{tmp}/a.json: row 1: a row must be a JSON object",
         files={"a.json": json.dumps([GOOD, 3], indent=1)}),
    Case("data-not-utf8", ["--train", "{tmp}/l.jsonl"], "{tmp}/l.jsonl: line 2: not UTF-8 text",
         files={"l.jsonl": jsonl(GOOD).encode() + (json.dumps({**GOOD, "question": "Caf\u00e9 sells 2 cakes and 3 more?"}, ensure_ascii=False) + "\n").encode("latin-1")}),
    Case("data-key-twice", ["--train", "{tmp}/d.jsonl"], "{tmp}/d.jsonl: line 1: key 'question' is given twice in one object",
         files={"d.jsonl": json.dumps(GOOD)[:-1] + ', "question": "Other?"}\n'}),
    Case("data-key-twice-in-a-message", ["--train", "{tmp}/d.jsonl"], "{tmp}/d.jsonl: line 1: key 'content' is given twice",
         files={"d.jsonl": jsonl(GOOD_MESSAGES).replace('"content": "What is 6 * 7?"}', '"content": "What is 6 * 7?", "content": "x"}', 1)}),
    Case("data-key-twice-in-json-array", ["--train", "{tmp}/d.json"], "{tmp}/d.json: key 'answer' is given twice in one object",
         files={"d.json": json.dumps([GOOD], indent=1).replace('"answer"', '"answer": "1\\n#### 1",\n  "answer"', 1)}),
    Case("data-answer-normalizes-to-nothing", ["--train", "{tmp}/a.jsonl"], "{tmp}/a.jsonl#0: field 'answer' is '.', which holds no answer",
         files={"a.jsonl": jsonl(messages_row(answer="."))}),
    Case("data-template-refuses-row", ["--student", "{tmp}/strict", "--train", "{tmp}/s.jsonl"],
         "{tmp}/s.jsonl#0: field 'teacher_messages': the tokenizer's chat template refuses it (System turns are not supported)",
         files={"s.jsonl": jsonl(messages_row(teacher_messages=[{"role": "system", "content": "Hint: 6 * 7 = 42."},
                                                                 {"role": "user", "content": "What is 6 * 7?"}]))},
         build=with_strict_template),
    Case("data-template-drops-the-hint", ["--student", "{tmp}/skips-system", "--train", "{tmp}/s.jsonl"],
         "{tmp}/s.jsonl#0: field 'teacher_messages': its rendered prompt adds nothing to the student's (the same 15 token ids; "
         "the chat template dropped the system turn (message 0))",
         files={"s.jsonl": jsonl(messages_row(teacher_messages=[{"role": "system", "content": "Hint: 6 * 7 = 42."},
                                                                 {"role": "user", "content": "What is 6 * 7?"}]))},
         build=with_template("skips-system", SKIPS_SYSTEM)),
    Case("data-template-drops-the-hint-heldout", ["--student", "{tmp}/replaces-system", "--heldout", "{tmp}/h.jsonl"],
         "{tmp}/h.jsonl#0: field 'teacher_messages': its rendered prompt adds nothing to the student's (none of the teacher's "
         "own messages reaches its 15 token ids; the chat template dropped the system turn (message 0))",
         files={"h.jsonl": jsonl(messages_row(teacher_messages=[{"role": "system", "content": "Hint: 6 * 7 = 42."},
                                                                 {"role": "user", "content": "What is 6 * 7?"}]))},
         build=with_template("replaces-system", REPLACES_SYSTEM)),
    Case("data-null-line", ["--train", "{tmp}/n.jsonl"], "{tmp}/n.jsonl: line 2: a row must be a JSON object, got null",
         files={"n.jsonl": jsonl(GOOD) + "null\n"}),
    Case("data-unknown-columns", ["--train", "{tmp}/u.jsonl"], "{tmp}/u.jsonl: cannot tell the row format from columns",
         files={"u.jsonl": jsonl({"prompt": "hi", "completion": "there"})}),
    # ---- models
    Case("model-missing", ["--student", "{tmp}/no-model"], "model.student='{tmp}/no-model': no such directory"),
    Case("model-empty-folder", ["--student", "{tmp}/empty"], "model.student='{tmp}/empty' is an empty folder", files={"empty/": ""}),
    Case("model-folder-without-config", ["--student", "{tmp}/w"], "model.student='{tmp}/w' has no config.json", files={"w/weights.bin": "x"}),
    Case("model-is-a-file", ["--student", "{tmp}/f.bin"], "model.student='{tmp}/f.bin' is a file", files={"f.bin": "x"}),
    Case("model-weights-truncated", ["--student", "{tmp}/cut"], "model.student='{tmp}/cut': model.safetensors is truncated or padded",
         build=with_truncated_weights),
    Case("teacher-weights-truncated", ["--teacher", "{tmp}/cut"], "model.teacher='{tmp}/cut': model.safetensors is truncated or padded",
         build=with_truncated_weights),
    Case("teacher-missing", ["--teacher", "{tmp}/no-teacher"], "model.teacher='{tmp}/no-teacher': no such directory"),
    Case("embedded-unknown", ["--student", "embedded:gpt-5"], "unknown embedded model 'embedded:gpt-5'"),
    Case("model-without-chat-template", ["--student", "{tmp}/no-template"], "model.student='{tmp}/no-template': its tokenizer has no chat template",
         build=without_chat_template),
    Case("model-without-tokenizer", ["--student", "{tmp}/no-tokenizer"],
         "model.student='{tmp}/no-tokenizer': cannot load its tokenizer (the folder holds none of tokenizer.json", build=without_tokenizer_files),
    Case("teacher-head-narrower", ["--student", "{tmp}/padded", "--teacher", "{model}"],
         "model.teacher: its lm_head has 49152 rows and the student's 49216", build=with_padded_vocabulary),
    Case("teacher-vocabulary-narrower-than-the-tokenizer", ["--teacher", "{tmp}/rows-1000", "--objective", "sampled_rkl"],
         "model.teacher: its config's vocab_size gives it 1000 rows, fewer than the tokenizer's 49152 tokens and the student's",
         build=with_vocabulary_rows(1000)),
    Case("teacher-logit-transform-unknown", ["--teacher", "{tmp}/scaled"],
         "model.teacher: its config sets logit_scale=4.0, a transform of the logits after the lm_head that opd-local does "
         "not know how model type 'llama' applies", build=with_unknown_logit_transform),
    Case("student-context-short", ["--student", "{tmp}/short"], "= 1024 exceeds the student's context of 512 tokens",
         build=with_context(512)),
    Case("probe-text-one-token", ["--probe_text", "a"], "sync.probe_text='a' is 1 token(s); the parity probe needs at least 2"),
]


def test_the_table_is_large_and_its_cases_distinct():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)
    assert len({(tuple(c.args), c.resume, c.damage, tuple(sorted(c.files.items())), c.overwrite, c.build, c.inject, c.file_size_limit)
                for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_refused_on_one_line_and_touches_nothing(case, finished_run, micro_model_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    undo = case.damage(run) if case.damage else None
    inputs = tmp_path / "inputs"
    for name, text in case.files.items():
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            (inputs / name).mkdir()
        elif isinstance(text, bytes):
            (inputs / name).write_bytes(text)
        else:
            (inputs / name).write_text(text)
    if case.build:
        inputs.mkdir(exist_ok=True)
        case.build(inputs, micro_model_dir)
    fill = {"tmp": str(inputs), "run": str(run), "model": micro_model_dir}
    args = [a.format(**fill) for a in case.args]
    if case.resume:
        argv = args if "--resume" in args else ["--resume", str(run), *args]
    else:
        argv = base_args(micro_model_dir, run, *(["--overwrite"] if case.overwrite else []), *args)
    before = snapshot(run)
    capsys.readouterr()
    if case.inject:
        case.inject(monkeypatch)
    limit, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.getsignal(signal.SIGXFSZ)
    if case.file_size_limit:
        # A write past the limit fails with EFBIG, as one past a full disk fails with ENOSPC (the signal ignored).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (case.file_size_limit(micro_model_dir), limit[1]))

    try:
        code = train_main(argv)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
        if undo:
            undo()

    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(("error:", "interrupted"))]
    assert code == case.code, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert case.expect.format(**fill) in errors[0], errors[0]
    assert snapshot(run) == before


def test_debug_shows_the_traceback(micro_model_dir, tmp_path, capsys):
    assert train_main(base_args(micro_model_dir, tmp_path / "run", "--device", "gpu", "--debug")) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError: --run.device: 'gpu' is not one of" in err


def test_a_crash_after_the_run_started_puts_the_overwritten_run_back(finished_run, micro_model_dir, tmp_path, monkeypatch, capsys):
    """Not a refusal (a bug's traceback), yet the run that --overwrite replaced is back, byte for byte."""
    import opd_local.loop

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)

    def crash(*args, **kwargs):
        raise ZeroDivisionError("a bug in step 0")

    monkeypatch.setattr(opd_local.loop, "train_on_rollouts", crash)
    with pytest.raises(ZeroDivisionError):
        train_main(base_args(micro_model_dir, run) + ["--overwrite"])
    assert f"warning: the run failed before it stood; {run} holds the run it replaced, as it was" in capsys.readouterr().err
    assert snapshot(run) == before


def test_ctrl_c_in_a_resumed_run_says_where_it_stopped_and_what_resumes_it(finished_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    interrupt_at_step(0)(monkeypatch)
    assert train_main(["--resume", str(run), "--steps", "3"]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert f"interrupted at step 2; resume with --resume {run} (from step-000002)" in err.splitlines(), err
    assert "Traceback" not in err and not (run / LOCK_FILE).exists()
