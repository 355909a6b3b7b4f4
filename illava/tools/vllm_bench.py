"""iLLaVA's ViT stage in vLLM, measured: requests per second, time to first token and peak memory of vLLM serving
a random-weight model of a named geometry (`illava.tools.bench.GEOMETRIES`), without the plugin's settings and
with each iLLaVA setting, side by side in one run (one engine per setting, one after the other). Run it in the
vLLM environment (see `.ci/run`):

    python -m illava.tools.vllm_bench --geometry qwen3-vl-2b-cpu --image-size 448
    python -m illava.tools.vllm_bench --geometry qwen2.5-vl-7b-cpu --image-size 448
    python -m illava.tools.vllm_bench --geometry qwen3-vl-8b --device cuda --dtype bfloat16 --requests 64

Time to first token is the median wall time of one request with one new token; throughput sends `--requests`
requests (each its own random image) at once with `--new-tokens` new tokens each; peak memory is taken during one
more such batch of new images, above the level the loaded engine holds (`illava.tools.measure.PeakMemory`: peak
tensor memory).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .bench import GEOMETRIES, build_model, positive_int
from .measure import PeakMemory

logger = logging.getLogger(__name__)

# the iLLaVA settings measured per family, besides vLLM without any
VLLM_SETTINGS = {
    # the reference's Qwen3-VL ViT setting (kept fraction 0.90 per layer = r 0.10 merged away)
    "qwen3_vl": {"vit 5-8 r.10 (reference)": dict(enable_illava_vit=True, illava_vit_k="5-6-7-8", illava_vit_r=0.10),
                 "vit 5-8 r.25": dict(enable_illava_vit=True, illava_vit_k="5-6-7-8", illava_vit_r=0.25)},
    # Qwen2.5-VL: the ViT part of the VLMEvalKit Qwen2-VL setting, and a stronger one
    "qwen2_vl": {"vit 12-15 r.16": dict(enable_illava_vit=True, illava_vit_k="12-13-14-15", illava_vit_r=0.16),
                 "vit 8-11 r.25": dict(enable_illava_vit=True, illava_vit_k="8-9-10-11", illava_vit_r=0.25)},
}
PROMPT = "<|vision_start|><|image_pad|><|vision_end|>Describe the image."


def requests(count: int, size: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt": PROMPT,
             "multi_modal_data": {"image": Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))}}
            for _ in range(count)]


def measure(model_dir: str, settings: dict | None, args) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=args.eager,
              limit_mm_per_prompt={"image": 1}, hf_overrides={"illava": settings} if settings else None,
              seed=0)
    try:
        one = SamplingParams(max_tokens=1, temperature=0)
        batch = requests(args.requests, args.image_size)
        llm.generate(batch[:1], one, use_tqdm=False)  # warm-up
        first_token = []
        for index in range(args.repeats):
            start = time.perf_counter()
            out = llm.generate(batch[index % len(batch)], one, use_tqdm=False)
            first_token.append(time.perf_counter() - start)
        prompt_tokens = len(out[0].prompt_token_ids)
        sampling = SamplingParams(max_tokens=args.new_tokens, min_tokens=args.new_tokens, temperature=0)
        start = time.perf_counter()
        llm.generate(batch, sampling, use_tqdm=False)
        elapsed = time.perf_counter() - start
        # apart, on images not seen yet (the prefix cache holds the others): on CPU the memory profiler slows it
        with PeakMemory(args.device) as peak:
            llm.generate(requests(args.requests, args.image_size, seed=1), sampling, use_tqdm=False)
        return {"prompt_tokens": prompt_tokens, "ttft_s": statistics.median(first_token),
                "requests_per_s": len(batch) / elapsed, "peak_bytes": peak.bytes}
    finally:
        del llm
        gc.collect()


def markdown_table(rows: list[dict]) -> str:
    header = "| " + " | ".join(rows[0]) + " |"
    lines = [header, "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(value) for value in row.values()) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    geometries = sorted(name for name, (family, *_) in GEOMETRIES.items() if family in VLLM_SETTINGS
                        and (family != "qwen2_vl" or name.startswith("qwen2.5")))
    parser.add_argument("--geometry", default="qwen3-vl-2b-cpu", choices=geometries)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--image-size", type=positive_int, default=448)
    parser.add_argument("--requests", type=positive_int, default=8)
    parser.add_argument("--new-tokens", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--max-model-len", type=positive_int, default=4096)
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=None,
                        help="enforce_eager (default: on CPU only)")
    parser.add_argument("--output_dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.eager is None:
        args.eager = args.device == "cpu"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its memory is seen
    if args.device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model, processor, family = build_model(args.geometry, "cpu", getattr(torch, args.dtype), "sdpa")
    rows = []
    with tempfile.TemporaryDirectory() as model_dir:
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
        del model
        for name, settings in {"baseline": None, **VLLM_SETTINGS[family]}.items():
            result = measure(model_dir, settings, args)
            rows.append({"setting": name, **result})
            logger.info("%s: %s", name, result)
    baseline = rows[0]
    table = [{
        "setting": row["setting"],
        "prompt tokens": row["prompt_tokens"],
        "requests/s": f"{row['requests_per_s']:.2f} ({row['requests_per_s'] / baseline['requests_per_s']:.2f}x)",
        "time to first token": f"{row['ttft_s'] * 1000:.0f} ms ({row['ttft_s'] / baseline['ttft_s']:.2f}x)",
        "peak memory": f"{row['peak_bytes'] / 2**20:.0f} MiB",
    } for row in rows]
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    stem = f"vllm-bench-{args.geometry}-{args.device}-{args.dtype}-{args.image_size}px"
    (output / f"{stem}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    (output / f"{stem}.md").write_text(markdown_table(table) + "\n")
    print(markdown_table(table))


if __name__ == "__main__":
    main()
