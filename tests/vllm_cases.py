"""The requests the vLLM tests send, and one engine run over them; also a command line, for the runs that need a
process of their own (vLLM without plugins, tensor parallelism):

    python -m tests.vllm_cases '{"model": dir, "settings": {...} | null, "cases": [...], "engine": {...}}'

prints one JSON line `RESULTS [[tokens, cumulative log-probability, prompt length], ...]`."""

from __future__ import annotations

import gc
import json
import os
import sys

import numpy as np
from PIL import Image

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
NEW_TOKENS = 5
FPS = 2.0


def media(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": Image.fromarray(rng.integers(0, 255, (100, 150, 3), dtype=np.uint8)),
        "tall_image": Image.fromarray(rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)),
        "video": rng.integers(0, 255, (4, 84, 112, 3), dtype=np.uint8),
    }


def case(name: str) -> tuple[str, dict]:
    """(prompt, media by modality) of a named request; "long_" before a name: its prompt with 40 more words after
    it, so that its prefix fills cache blocks."""
    if name.startswith("long_"):
        prompt, data = case(name[len("long_"):])
        return prompt + " and then" * 20, data
    items = media()
    if name == "image":
        return IMAGE + "describe", {"image": [items["image"]]}
    if name == "two_images":
        return IMAGE + IMAGE + "compare", {"image": [items["image"], items["tall_image"]]}
    if name == "tall_image":
        return "look: " + IMAGE + "what is it", {"image": [items["tall_image"]]}
    if name == "video":
        return VIDEO + "what happens", {"video": [items["video"]]}
    raise ValueError(name)


def vllm_request(name: str) -> dict:
    prompt, data = case(name)
    multi_modal_data = {}
    if "image" in data:
        multi_modal_data["image"] = data["image"] if len(data["image"]) > 1 else data["image"][0]
    if "video" in data:  # each video: (frames [T, H, W, 3], its metadata)
        videos = [(frames, {"fps": FPS, "frames_indices": list(range(len(frames))), "total_num_frames": len(frames),
                            "duration": len(frames) / FPS, "video_backend": "opencv", "do_sample_frames": False})
                  for frames in data["video"]]
        multi_modal_data["video"] = videos if len(videos) > 1 else videos[0]
    return {"prompt": prompt, "multi_modal_data": multi_modal_data}


def run_vllm(model: str, settings: dict | None, cases: list[str], one_by_one: bool = False, **engine) -> list[list]:
    """Greedy `NEW_TOKENS` for every case, sent as one batch (or one request after the other): [tokens, cumulative
    log-probability, prompt length, prompt tokens served from the prefix cache]."""
    from vllm import LLM, SamplingParams

    limits = {"image": 2, "video": 1}
    llm = LLM(model=model, enforce_eager=True, dtype="float32", max_model_len=2048, limit_mm_per_prompt=limits,
              hf_overrides={"illava": settings} if settings is not None else None, **engine)
    try:
        sampling = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=1)
        batches = [[name] for name in cases] if one_by_one else [cases]
        outputs = [out for batch in batches
                   for out in llm.generate([vllm_request(name) for name in batch], sampling, use_tqdm=False)]
        return [[list(out.outputs[0].token_ids), out.outputs[0].cumulative_logprob, len(out.prompt_token_ids),
                 out.num_cached_tokens or 0] for out in outputs]
    finally:
        del llm
        gc.collect()


def main() -> None:
    request = json.loads(sys.argv[1])
    results = run_vllm(request["model"], request["settings"], request["cases"], **request.get("engine", {}))
    sys.stdout.write("RESULTS " + json.dumps(results) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    main()
