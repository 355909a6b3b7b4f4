"""Prefill time and peak memory of a medium-size random-weight LLaVA-OneVision, baseline vs iLLaVA, side by side.

Each setting runs in its own subprocess (so allocator state of one does not flatter another); the table reports
medians over repeats and ratios to the baseline measured in this same run. Peak memory, from one more prefill apart,
is the peak of live tensor memory above the level before it (`illava.tools.measure.PeakMemory`).

    python benchmarks/prefill.py                        # CPU, 768x768 image, 3 repeats
    python benchmarks/prefill.py --device cuda --dtype bfloat16 --image-size 1152
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {
    "baseline": {},
    "vit 5-6-7-8 r=92": dict(enable_illava_vit=True, illava_vit_k="5-6-7-8", illava_vit_r=92),
    "llm 8 keep 0.70": dict(enable_illava_llm=True, illava_llm_k="8", illava_llm_r=0.70),
    "vit + llm (paper)": dict(
        enable_illava_vit=True, illava_vit_k="5-6-7-8", illava_vit_r=92,
        enable_illava_llm=True, illava_llm_k="8", illava_llm_r=0.70,
    ),
}


def build_medium_model(device: str, dtype: str):
    """SigLIP-384/14 geometry (27x27 tokens per crop) at ViT-S width, and a 12-layer 512-wide Qwen2."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from illava.tools.tiny_models import tiny_llava_onevision

    _, processor = tiny_llava_onevision(image_size=384, vision_layers=1, text_layers=1)
    config = _medium_config(processor)
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval().to(device, getattr(torch, dtype))
    return model, processor


def _medium_config(processor):
    from transformers import LlavaOnevisionConfig

    tokenizer = processor.tokenizer
    pinpoints = processor.image_processor.image_grid_pinpoints
    return LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
            num_attention_heads=6, image_size=384, patch_size=14, vision_use_head=False,
        ),
        text_config=dict(
            model_type="qwen2", vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048,
            num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32768,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )


def measure(setting: str, device: str, dtype: str, image_size: int, repeats: int, threads: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    import illava
    from illava.tools.measure import PeakMemory

    torch.set_num_threads(threads)
    model, processor = build_medium_model(device, dtype)
    if SETTINGS[setting]:
        illava.apply(model, SETTINGS[setting], processor=processor)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))
    inputs = processor(images=[[image]], text="<image>Describe the image in detail.", return_tensors="pt")
    inputs = inputs.to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, dtype))

    def prefill():
        with torch.no_grad():
            model(**inputs, logits_to_keep=1, use_cache=True)
        if device == "cuda":
            torch.cuda.synchronize()

    prefill()  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        prefill()
        seconds.append(time.perf_counter() - start)
    with PeakMemory(device) as peak:  # a run of its own: on CPU its profiler slows the run
        prefill()
    trace = illava.last_trace(model) if illava.is_applied(model) else None
    llm_tokens = int(inputs["input_ids"].shape[1])
    if trace is not None and trace.language:
        llm_tokens = int((trace.language[-1].positions[0] >= 0).sum())
    return {
        "setting": setting,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "tokens_after_last_llm_merge": llm_tokens,
        "seconds": statistics.median(seconds),
        "peak_bytes": peak.bytes,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--image-size", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: run one setting in this process
    args = parser.parse_args(argv)
    common = [f"--device={args.device}", f"--dtype={args.dtype}", f"--image-size={args.image_size}",
              f"--repeats={args.repeats}", f"--threads={args.threads}"]
    if args.only:
        print(json.dumps(measure(args.only, args.device, args.dtype, args.image_size, args.repeats, args.threads)))
        return
    rows = []
    for setting in SETTINGS:
        output = subprocess.run(
            [sys.executable, __file__, *common, f"--only={setting}"],
            check=True, capture_output=True, text=True,
        ).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    base = rows[0]
    print(f"device={args.device} dtype={args.dtype} image={args.image_size}x{args.image_size} "
          f"repeats={args.repeats} threads={args.threads}")
    print(f"{'setting':20s} {'prompt':>7s} {'llm-late':>8s} {'prefill s':>10s} {'speed-up':>8s} "
          f"{'peak MiB':>9s} {'mem ratio':>9s}")
    for row in rows:
        print(
            f"{row['setting']:20s} {row['prompt_tokens']:7d} {row['tokens_after_last_llm_merge']:8d} "
            f"{row['seconds']:10.3f} {base['seconds'] / row['seconds']:7.2f}x "
            f"{row['peak_bytes'] / 2**20:9.1f} {row['peak_bytes'] / base['peak_bytes']:9.2f}"
        )


if __name__ == "__main__":
    main()
