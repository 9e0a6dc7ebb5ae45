"""Checkpoints: the final `save_pretrained` export and the resumable training state.

Both are written under a temporary name and renamed into place, so a crash mid-write leaves the
previous checkpoint intact and no half-written one behind.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from opd_local import distributed
from opd_local.atomic_files import replace_directory, with_umask_modes
from opd_local.models import is_peft_model
from opd_local.safetensors_files import safetensors_problem
from opd_local.write_failures import tensor_bytes, writing


def save_pretrained_atomic(model, tokenizer, target: Path) -> Path:
    """`save_pretrained` (safetensors) + tokenizer into `target`, replacing it atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with writing(target, "the model", tensor_bytes(model.state_dict())):
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            with_umask_modes(tmp)
            replace_directory(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_final_model(student, tokenizer, target: Path, ctx, replica) -> None:
    """The trained student, LoRA merged, as a `save_pretrained` directory written by rank 0.

    A sharded student is gathered into rank 0's host memory and loaded into `replica()`, a fresh
    CPU copy built the way the run built the student, which is then merged and saved.
    """
    module = distributed.unwrap(student)
    if distributed.is_sharded(student):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        distributed.reshard(student)
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if ctx.is_main:
            module = replica()
            module.load_state_dict(full)
    if ctx.is_main:
        # Training is over, so the adapter can be folded into the base weights in place.
        save_pretrained_atomic(module.merge_and_unload() if is_peft_model(module) else module, tokenizer, target)


# ---------------------------------------------------------------- resumable training state

CHECKPOINTS = "checkpoints"
LATEST = "latest"
SHARDED = "sharded"


def _tied_aliases(module) -> dict[str, str]:
    """Second names of a parameter registered twice (tied embeddings) -> its first name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _fill_tied_names(module, weights: dict) -> None:
    """Both names of every tied weight, from whichever one was saved (safetensors keeps just one)."""
    for alias, name in _tied_aliases(module).items():
        weights[name] = weights[alias] = weights[name] if name in weights else weights[alias]


def _by_name(module, optimizer_state: dict) -> dict:
    """A plain `optimizer.state_dict()` (parameters numbered in the order the optimizer was given
    them: the trainable ones, in module order) keyed by parameter name instead."""
    names = [name for name, param in module.named_parameters() if param.requires_grad]
    numbered = [i for group in optimizer_state["param_groups"] for i in group["params"]]
    if len(numbered) != len(names):
        raise RuntimeError(f"the checkpoint's optimizer holds {len(numbered)} parameters, this student trains {len(names)}")
    name_of = dict(zip(numbered, names))
    return {
        "state": {name_of[i]: value for i, value in optimizer_state["state"].items()},
        "param_groups": [{**group, "params": [name_of[i] for i in group["params"]]} for group in optimizer_state["param_groups"]],
    }


def _sharded_state(module, optimizer) -> tuple[dict, list]:
    """This rank's shards of the weights and of the optimizer's tensors, keyed by parameter name,
    and the optimizer's param_groups (numbers and names only, saved with the scheduler).

    A tied weight appears once: safetensors refuses two names for one storage.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = get_model_state_dict(module)
    for alias in _tied_aliases(module):
        model.pop(alias, None)
    optim = get_optimizer_state_dict(module, optimizer)
    return {"model": model, "optimizer": optim["state"]}, optim["param_groups"]


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(run_dir: Path, step: int, student, optimizer, scheduler, progress: dict, ctx, keep: int) -> Path:
    """Everything needed to continue exactly after `step` completed steps, written atomically.

    Every rank writes its RNG state; the main rank writes the weights (all of them, adapters
    included: safetensors, tied tensors handled), optimizer and scheduler state and the run's
    progress (data cursor, counters), then renames the directory into place and moves `latest`.
    A sharded student's weights and optimizer state go to `sharded/` instead, each rank writing
    its own shards (torch.distributed.checkpoint), so nothing is gathered onto one rank.
    """
    module = distributed.unwrap(student)
    root = Path(run_dir) / CHECKPOINTS
    target = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    need = tensor_bytes(module.state_dict()) + tensor_bytes(optimizer.state)
    with writing(target, f"the checkpoint of step {step}", need, temporary=tmp if ctx.is_main else None):
        _write_training_state(tmp, target, step, module, student, optimizer, scheduler, progress, ctx)
    if ctx.is_main:
        for old in checkpoints_to_prune(root, step, keep):
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return target


def _write_training_state(tmp: Path, target: Path, step: int, module, student, optimizer, scheduler, progress: dict, ctx) -> None:
    root = target.parent
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    torch.save(_rng_state(), tmp / f"rng_rank{ctx.rank}.pt")
    if distributed.is_sharded(student):
        import torch.distributed.checkpoint as dcp

        distributed.reshard(student)
        tensors, param_groups = _sharded_state(module, optimizer)
        # safetensors shards that carry their offsets in the JSON header: resuming unpickles nothing.
        writer = dcp.HuggingFaceStorageWriter(str(tmp / SHARDED), save_distributed=True)
        dcp.save(tensors, storage_writer=writer, process_group=distributed.trainer_group())
        optimizer_state = {"param_groups": param_groups}
    else:
        optimizer_state = {"optimizer": optimizer.state_dict()}
    if ctx.is_main:
        if not distributed.is_sharded(student):
            save_model(module, str(tmp / "model.safetensors"))
        torch.save({**optimizer_state, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        # dcp.save has returned on every rank, so the shards are all written: their names make the
        # checkpoint's manifest, and a shard missing later is then a damaged checkpoint, not a partial load.
        manifest = {"step": step, "world_size": ctx.world_size}
        if distributed.is_sharded(student):
            manifest["shards"] = sorted(p.name for p in (tmp / SHARDED).glob("*.safetensors"))
        (tmp / "progress.json").write_text(json.dumps({**manifest, **progress}))
    distributed.barrier()
    if ctx.is_main:
        replace_directory(tmp, target)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(target.name)
        os.replace(pointer, root / LATEST)


def checkpoints_to_prune(root: Path, step: int, keep: int) -> list[Path]:
    """After saving `step`: every folder past it, and all but the `keep` newest up to it (0 keeps them all).

    A folder past the step just saved can only be one a resume skipped as damaged, from the stretch of
    the run that this one is redoing; the folder just saved is never pruned.
    """
    steps = checkpoint_steps(root)
    past = [folder for folder, n in steps.items() if n > step]
    upto = [folder for folder, n in steps.items() if n <= step]
    return past + (upto[:-keep] if keep > 0 else [])


def checkpoint_steps(root: Path) -> dict[Path, int]:
    """The run's checkpoint folders and the step each one's name gives, oldest first."""
    steps = {}
    for folder in Path(root).glob("step-*"):
        match = re.fullmatch(r"step-(\d+)", folder.name)
        if match is not None and folder.is_dir():
            steps[folder] = int(match.group(1))
    return dict(sorted(steps.items(), key=lambda item: item[1]))


def read_progress(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / "progress.json").read_text())


def _torch_file_problem(path: Path) -> str | None:
    """Whether a torch.save file is whole: its zip directory, written last, is readable."""
    if not path.is_file():
        return "missing"
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        return f"damaged ({err})"
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What makes a checkpoint folder unusable, naming the file, or None when it is whole.

    Checks what can be checked without reading the weights: every file is there and complete, and
    progress.json agrees with the folder it sits in. A bit flipped inside a tensor is not caught.
    """
    checkpoint = Path(checkpoint)
    match = re.fullmatch(r"step-(\d+)", checkpoint.name)
    if match is None:
        return f"{checkpoint}: not a checkpoint folder name (step-NNNNNN)"
    progress_file = checkpoint / "progress.json"
    try:
        progress = json.loads(progress_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{progress_file}: unreadable ({err})"
    if not isinstance(progress, dict) or not all(key in progress for key in ("step", "stream", "cumulative")):
        return f"{progress_file}: lacks step, stream or cumulative"
    if progress["step"] != int(match.group(1)):
        return f"{progress_file}: says step {progress['step']!r} but sits in {checkpoint.name}"
    files = {"optimizer.pt": _torch_file_problem}
    sharded = checkpoint / SHARDED
    if sharded.exists():
        # Checkpoints written before the manifest was recorded: the shards that are there.
        names = progress.get("shards") or sorted(p.name for p in sharded.glob("*.safetensors"))
        files.update({f"{SHARDED}/{name}": safetensors_problem for name in names})
        if len(files) == 1:
            return f"{sharded}: holds no safetensors shards"
    else:
        files["model.safetensors"] = safetensors_problem
    # Checkpoints written before the rank count was recorded have as many RNG files as ranks.
    ranks = progress.get("world_size", max(1, len(list(checkpoint.glob("rng_rank*.pt")))))
    files.update({f"rng_rank{rank}.pt": _torch_file_problem for rank in range(ranks)})
    for name, problem_of in files.items():
        problem = problem_of(checkpoint / name)
        if problem:
            return f"{checkpoint / name}: {problem}"
    return None


def newest_intact_checkpoint(run_dir: Path, at_most: int | None = None) -> tuple[Path, dict]:
    """The newest checkpoint (of step `at_most` or earlier, if given) that is whole, and its progress;
    each damaged newer one is named in a warning.

    Raises ValueError when the run has none, or none is whole.
    """
    root = Path(run_dir) / CHECKPOINTS
    # Folders only get their step-NNNNNN name once complete, so the newest is the latest even when a
    # crash came between that rename and the move of the `latest` pointer.
    steps = checkpoint_steps(root)
    candidates = [folder for folder in reversed(steps) if at_most is None or steps[folder] <= at_most]
    if not candidates:
        raise ValueError(f"--resume {run_dir}: it holds no checkpoint yet (run.save_every writes them)")
    problems = []
    for checkpoint in candidates:
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            for skipped in problems:
                warnings.warn(f"skipping a damaged checkpoint: {skipped}; resuming from {checkpoint.name}", stacklevel=2)
            return checkpoint, read_progress(checkpoint)
        problems.append(problem)
    raise ValueError(f"--resume {run_dir}: no intact checkpoint; newest: {problems[0]}")


def load_training_state(checkpoint: Path, student, optimizer, scheduler, ctx) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG; returns the saved progress."""
    module = distributed.unwrap(student)
    sharded_dir = Path(checkpoint) / SHARDED
    # Which AdamW implementation steps is this run's choice (build_optimizer's), not the saved run's:
    # a state dict carries its `fused` and `foreach` flags, which would otherwise win.
    implementation = [{k: group[k] for k in ("fused", "foreach") if k in group} for group in optimizer.param_groups]
    # weights_only: a checkpoint is data, never code.
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True, map_location="cpu")
    if sharded_dir.exists() or distributed.is_sharded(student):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        distributed.reshard(student)
        if sharded_dir.exists():
            # Works for any layout: each rank reads the pieces its own parameters need.
            import torch.distributed.checkpoint as dcp

            tensors, _ = _sharded_state(module, optimizer)
            # One process resuming shards must not talk over a default group some library started.
            group = distributed.trainer_group()
            dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(sharded_dir)), process_group=group, no_dist=group is None)
            weights, optimizer_state = tensors["model"], {"state": tensors["optimizer"], "param_groups": state["param_groups"]}
            options = StateDictOptions()
        else:
            # Whole weights from DDP or one process, split here: every rank reads the file and keeps its shards.
            from safetensors.torch import load_file

            weights = load_file(str(checkpoint / "model.safetensors"))
            optimizer_state = _by_name(module, state["optimizer"])
            options = StateDictOptions(full_state_dict=True)
        _fill_tied_names(module, weights)
        set_model_state_dict(module, weights, options=options)
        set_optimizer_state_dict(module, optimizer, optimizer_state, options=options)
    else:
        load_model(module, str(checkpoint / "model.safetensors"), device=str(next(module.parameters()).device))
        optimizer.load_state_dict(state["optimizer"])
    for group, flags in zip(optimizer.param_groups, implementation):
        group.update(flags)
    scheduler.load_state_dict(state["scheduler"])
    progress = read_progress(checkpoint)
    saved_ranks = progress.get("world_size", len(list(Path(checkpoint).glob("rng_rank*.pt"))))
    if saved_ranks == ctx.world_size:
        _set_rng_state(torch.load(checkpoint / f"rng_rank{ctx.rank}.pt", weights_only=True))
    else:
        # Rollouts are seeded per group and step, and the data cursor is global, so only what draws
        # from the global RNG (LoRA dropout) differs from a run that kept its rank count.
        if ctx.is_main:
            warnings.warn(
                f"{checkpoint} was written by {saved_ranks} ranks and is resumed by {ctx.world_size}: "
                "the RNG is reseeded per rank, so dropout draws differ from an uninterrupted run"
            )
        seed = 1_000_003 * progress["step"] + ctx.rank
        torch.manual_seed(seed)
        random.seed(seed)
    return progress
