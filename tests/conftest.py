import numpy as np
import pytest
import torch
from PIL import Image

from illava.tools.tiny_models import tiny_llava_onevision


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


@pytest.fixture(scope="session")
def small_ov():
    """56 px / patch 14: a 4x4 grid per crop, 6 SigLIP layers, 4 Qwen2 layers."""
    return tiny_llava_onevision(image_size=56, vision_layers=6)


@pytest.fixture(scope="session")
def siglip384_ov():
    """The real SigLIP geometry (384 px, patch 14, 27x27 = 729 tokens per crop) with a narrow width and
    9 layers, so that k = 2..8 exist."""
    return tiny_llava_onevision(image_size=384, vision_layers=9, text_layers=2)


def logits_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits
