"""Which of the engine's layers a push reached: the weights a push must write (those the trainer trains), and each
layer's weights as vLLM processes them after a load, the last point at which a CPU engine's packed weights can
be read. `VLLMSampler.prove_push` compares them between the engine's own load and a push.
"""

from __future__ import annotations

import contextlib

import torch

from opd_local.weight_fingerprint import fingerprint


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
