"""Flash-attention against SDPA on a CUDA GPU, for every family of the contract suite (`pytest -m gpu`; skipped
without a GPU and flash-attn): in bf16, merging with flash-attention-2 (the VLMs, SigLIP2, transformers' own flash
path) or flash-attn's varlen kernel (LLaVA-ViT and the packing encoders, the path they take when it is installed)
keeps the same tokens per merge layer as with SDPA, and the outputs agree within bf16 noise."""

from __future__ import annotations

import pytest
import torch

import illava
from illava.models import llava_vit, packing_encoders

from .families import FAMILIES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with flash-attn"),
]

# families whose model runs flash-attn's varlen kernel by itself when it is importable (no attention switch)
OWN_VARLEN = {"llava_vit": llava_vit, "aimv2": packing_encoders, "dinov3": packing_encoders,
              "siglip2_packing": packing_encoders}


class OnDevice:
    """Calls a module with every tensor argument moved to `device` (floating ones cast to `dtype`)."""

    def __init__(self, module, device: str, dtype: torch.dtype):
        self.module, self.device, self.dtype = module, device, dtype

    def _place(self, value):
        if isinstance(value, torch.Tensor):
            return value.to(self.device, self.dtype if value.is_floating_point() else None)
        if isinstance(value, dict) or hasattr(value, "keys"):
            return {key: self._place(value[key]) for key in value.keys()}
        return value

    def __call__(self, *args, **kwargs):
        return self.module(*map(self._place, args), **self._place(kwargs))

    def generate(self, *args, **kwargs):
        return self.module.generate(*map(self._place, args), **self._place(kwargs))


def run(family: str, backend: str, monkeypatch):
    case = FAMILIES[family]()
    model = case.model.to("cuda", torch.bfloat16)
    if family in OWN_VARLEN:
        if backend == "sdpa":
            monkeypatch.setattr(OWN_VARLEN[family], "flash_attn_varlen_func", None)
    else:
        model.set_attn_implementation(backend)
    with illava.applied(model, processor=case.processor, **case.settings):
        output = case.call(OnDevice(model, "cuda", torch.bfloat16), 1)
        counts = [entry.tokens_per_group for entry in illava.last_trace(model).vision]
    monkeypatch.undo()
    outputs = output if isinstance(output, tuple) else (output,)
    return counts, [tensor.float().cpu() for tensor in outputs if tensor is not None]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_flash_attention_merges_as_sdpa(family, monkeypatch):
    pytest.importorskip("flash_attn")
    sdpa_counts, sdpa = run(family, "sdpa", monkeypatch)
    flash_counts, flash = run(family, "flash_attention_2", monkeypatch)
    assert flash_counts == sdpa_counts
    for expected, actual in zip(sdpa, flash, strict=True):
        assert torch.allclose(actual, expected, atol=0.1, rtol=0.05), (actual - expected).abs().max()
