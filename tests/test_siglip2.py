"""SigLIP2 NaFlex: per-image merging in a padded batch, padding mask and pooling head kept consistent.
(Off, r=0, remove, copies and bad settings: `test_contract.py`.)"""

import pytest
import torch
from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

import illava

from .conftest import random_image

VIT = dict(enable_illava_vit=True, illava_vit_k="1-2", illava_vit_r=4)


@pytest.fixture(scope="module")
def naflex():
    config = Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                 patch_size=8, num_patches=64, vision_use_head=True)
    torch.manual_seed(0)
    model = Siglip2VisionModel(config).eval()
    processor = Siglip2ImageProcessor(patch_size=8, max_num_patches=64)
    return model, processor


def run(model, processor, images):
    inputs = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs), inputs


def test_each_image_merges_alone_and_padding_follows(naflex):
    model, processor = naflex
    wide, square = random_image(40, 90, seed=1), random_image(64, 64, seed=2)
    with illava.applied(model, illava_track_vit_source=True, **VIT):
        batch, inputs = run(model, processor, [wide, square])
        entries = list(illava.last_trace(model).vision)
        alone = [run(model, processor, [image])[0] for image in (wide, square)]
    valid = inputs["pixel_attention_mask"].sum(dim=1).tolist()
    for image, entry in enumerate(entries):
        assert entry.tokens_per_group == [valid[image], valid[image] - 4, valid[image] - 8]
        kept = entry.tokens_per_group[-1]
        assert entry.positions.shape == (1, kept) and bool((entry.positions[0, 1:] > entry.positions[0, :-1]).all())
        torch.testing.assert_close(batch.last_hidden_state[image, :kept], alone[image].last_hidden_state[0, :kept],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch.pooler_output[image], alone[image].pooler_output[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(entry.sources[0, entry.positions[0]], torch.arange(kept))
    assert batch.last_hidden_state.shape[1] == max(entry.tokens_per_group[-1] for entry in entries)


def test_r_leaving_nothing_is_named(naflex):
    model, processor = naflex
    with illava.applied(model, enable_illava_vit=True, illava_vit_k="1", illava_vit_r=500):
        with pytest.raises(ValueError, match="illava_vit_r=500 leaves no token in image 0"):
            run(model, processor, [random_image(40, 90)])
