"""A self-contained demo: build a small random-weight LLaVA-OneVision with the real SigLIP token geometry
(384 px, patch 14, 27x27 tokens per crop), run one image and one video through it with and without iLLaVA,
and print the visual tokens before and after each merge layer and what the language model receives.

    python -m illava.demo                          # the paper's image setting: k=5-6-7-8, r=92
    python -m illava.demo --vit-k 2-3-4-5-6-7-8 --vit-r 80 --image photo.jpg
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

import illava
from illava.tiny_models import tiny_llava_onevision


def _synthetic_image(height: int, width: int) -> Image.Image:
    rows, cols = np.mgrid[0:height, 0:width]
    pixels = np.stack([rows * 255 // height, cols * 255 // width, (rows + cols) % 256], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


def _run(model, processor, inputs_fn):
    inputs = inputs_fn(processor)
    start = time.perf_counter()
    with torch.no_grad():
        model(**inputs)
    return inputs, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", help="an image file (default: a synthetic 480x640 gradient)")
    parser.add_argument("--vit-k", default="5-6-7-8")
    parser.add_argument("--vit-r", default="92")
    parser.add_argument("--frames", type=int, default=4, help="frames of the synthetic video")
    args = parser.parse_args(argv)

    model, processor = tiny_llava_onevision(image_size=384, vision_layers=9, text_layers=2)
    image = Image.open(args.image).convert("RGB") if args.image else _synthetic_image(480, 640)
    video = np.stack([np.asarray(_synthetic_image(384, 384).rotate(10 * i)) for i in range(args.frames)])

    def image_inputs(proc):
        return proc(images=[[image]], text="<image>Describe the image.", return_tensors="pt")

    def video_inputs(proc):
        return proc(videos=video, text="<video>What happens?", return_tensors="pt")

    config = illava.IllavaConfig(enable_illava_vit=True, illava_vit_k=args.vit_k, illava_vit_r=args.vit_r)
    image_token, video_token = model.config.image_token_id, model.config.video_token_id
    print(f"model: LLaVA-OneVision, SigLIP {model.config.vision_config.num_hidden_layers} layers, 27x27 tokens/crop")
    print(f"image {image.size[0]}x{image.size[1]}, video {args.frames} frames; illava_vit_k={args.vit_k} illava_vit_r={args.vit_r}")
    for label, enabled in (("baseline", False), ("iLLaVA", True)):
        if enabled:
            illava.apply(model, config, processor=processor)
        for kind, inputs_fn, token in (("image", image_inputs, image_token), ("video", video_inputs, video_token)):
            inputs, seconds = _run(model, processor, inputs_fn)
            llm_tokens = int((inputs["input_ids"] == token).sum())
            line = f"  {label:8s} {kind}: LLM receives {llm_tokens:5d} {kind} tokens, sequence {inputs['input_ids'].shape[1]:5d}"
            if enabled:
                entry = illava.last_trace(model).vision[0]
                steps = " -> ".join(str(count) for count in entry.tokens_per_group)
                line += f"; per {'crop' if kind == 'image' else 'frame'} x{entry.num_groups}: {steps} (layers {'-'.join(map(str, entry.merge_layers))})"
            print(line + f"  [{seconds * 1000:.0f} ms]")
    illava.remove(model)


if __name__ == "__main__":
    main()
