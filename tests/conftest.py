import numpy as np
import pytest
import torch
from PIL import Image

from illava.tools import tiny_models


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def random_video(frames: int, height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def write_mp4(path, frames: int, fps: int, height: int = 48, width: int = 64):
    """`frames` random frames at `fps` frames a second (MPEG-4 part 2: in every PyAV build, read by decord)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for pixels in random_video(frames, height, width):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder
    return path


def left_padded(built):
    """`(model, processor)` with the processor's tokenizer padding on the left, as batched generation needs (the
    one place tests set it)."""
    model, processor = built
    processor.tokenizer.padding_side = "left"
    return model, processor


QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
QWEN_VIT = dict(enable_illava_vit=True, illava_vit_k="2-3", illava_vit_r=3)


def capture_positions(model):
    """`(seen, handle)`: `seen["position_ids"]` becomes the position ids of the language model's last prefill."""
    seen = {}

    def hook(module, args, kwargs):
        if kwargs.get("position_ids") is not None and kwargs["inputs_embeds"].shape[1] > 1:
            seen["position_ids"] = kwargs["position_ids"]

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def tiny_ov(**options):
    """`illava.tools.tiny_models.tiny_llava_onevision`, padding on the left."""
    return left_padded(tiny_models.tiny_llava_onevision(**options))


def tiny_qwen2(**options):
    """`illava.tools.tiny_models.tiny_qwen2_vl` (Qwen2-VL / Qwen2.5-VL), padding on the left."""
    return left_padded(tiny_models.tiny_qwen2_vl(**options))


def tiny_qwen3(**options):
    """`illava.tools.tiny_models.tiny_qwen3_vl` (Qwen3-VL / -MoE / Qwen3.5), padding on the left."""
    return left_padded(tiny_models.tiny_qwen3_vl(**options))


@pytest.fixture(scope="session")
def small_ov():
    """56 px / patch 14: a 4x4 grid per crop, 6 SigLIP layers, 4 Qwen2 layers."""
    return tiny_ov(image_size=56, vision_layers=6)


@pytest.fixture(scope="session")
def siglip384_ov():
    """The real SigLIP geometry (384 px, patch 14, 27x27 = 729 tokens per crop) with a narrow width and
    9 layers, so that k = 2..8 exist."""
    return tiny_ov(image_size=384, vision_layers=9, text_layers=2)


def same(a, b) -> bool:
    """Bit-equal tensors (or tuples of them), NaN (positions merged away by the LLM stage) included."""
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def logits_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits
