"""Hub kernels (the `kernels` library): transformers >= 5.25 kernelizes in `from_pretrained` by default and again
on every `train()` / `eval()`. A kernelized model must merge and restore like a plain one, and a merge layer that
kernelization could take over must be refused by name, not silently lose its merge."""

import importlib.util

import pytest
import torch
import transformers
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

import illava
from illava.tools.tiny_models import tiny_llava_onevision, tiny_qwen2_vl

from .conftest import logits_of, random_image

KERNELS_AVAILABLE = importlib.util.find_spec("kernels") is not None and "set_use_kernels" in dir(
    transformers.PreTrainedModel
)
SETTINGS = dict(enable_illava_vit=True, illava_vit_k="2-3", illava_vit_r=3, enable_illava_llm=True,
                illava_llm_k="2", illava_llm_r=0.5)
FAMILIES = {
    "llava_onevision": (lambda: tiny_llava_onevision(image_size=56, vision_layers=6), "<image>describe"),
    "qwen2_vl": (tiny_qwen2_vl, "<|vision_start|><|image_pad|><|vision_end|>describe"),
}


def load(model, folder, **options):
    return type(model).from_pretrained(folder, attn_implementation="sdpa", **options).eval()


@pytest.mark.skipif(not KERNELS_AVAILABLE, reason="this transformers has no hub-kernel support (before 5.25) "
                    "or the kernels package is not installed")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_kernelized_model_merges_and_restores_like_a_plain_one(family, tmp_path):
    build, prompt = FAMILIES[family]
    model, processor = build()
    model.save_pretrained(tmp_path)
    plain, kernelized = load(model, tmp_path, use_kernels=False), load(model, tmp_path, use_kernels=True)
    assert kernelized.use_kernels and not plain.use_kernels
    inputs = processor(images=[random_image(70, 100)], text=prompt, return_tensors="pt")
    unmerged = logits_of(plain, inputs)
    with illava.applied(plain, processor=processor, **SETTINGS):
        merged_inputs = processor(images=[random_image(70, 100)], text=prompt, return_tensors="pt")
        merged = logits_of(plain, merged_inputs)
    assert merged.shape[1] < unmerged.shape[1]  # the patched processor emits the merged placeholder count
    with illava.applied(kernelized, processor=processor, **SETTINGS):
        kernelized.train()
        kernelized.eval()  # a change of mode kernelizes again
        # NaN where the LLM stage merged a token away, in both
        assert torch.allclose(logits_of(kernelized, merged_inputs), merged, atol=1e-5, equal_nan=True)
        counts = illava.last_trace(kernelized).vision[0].tokens_per_group
        assert counts[-1] < counts[0]
    assert torch.allclose(logits_of(kernelized, inputs), unmerged, atol=1e-5)
    assert not any("forward" in vars(module) for module in kernelized.modules())


def test_a_merge_layer_that_hub_kernels_may_replace_is_refused_by_name(monkeypatch):
    model, processor = tiny_llava_onevision(image_size=56, vision_layers=6)
    monkeypatch.setattr(SiglipEncoderLayer, "kernel_layer_name", "SiglipEncoderLayer", raising=False)
    with pytest.raises(RuntimeError, match=r"SiglipEncoderLayer is a hub-kernel layer.*use_kernels=False"):
        illava.apply(model, processor=processor, enable_illava_vit=True, illava_vit_k="2", illava_vit_r=2)
    assert not illava.is_applied(model)
    assert not any("forward" in vars(module) for module in model.modules())
