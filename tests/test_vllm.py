"""iLLaVA's ViT stage inside vLLM (`illava.vllm`), on vLLM's CPU build with tiny checkpoints saved here. Runs in
the vLLM environment (`.ci/run`: its own venv, vLLM pins its own torch and transformers); skips elsewhere.

- the plugin without iLLaVA settings == vLLM without plugins (tokens and log-probabilities);
- the plugin with the ViT stage == illava's transformers path with the same settings: greedy tokens equal,
  log-probabilities close, the same prompt lengths (one placeholder per surviving window), for an image, two
  images, a tall image after text and a video, all sent as one batch; a Qwen3-VL video split between prefill
  steps (prefix cache, chunked prefill) == in one;
- tensor_parallel_size=2 == 1;
- what is refused is refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm")

import illava  # noqa: E402
from illava.tools.tiny_models import tiny_qwen2_vl, tiny_qwen3_vl  # noqa: E402

from transformers.video_utils import VideoMetadata  # noqa: E402

from .vllm_cases import FPS, NEW_TOKENS, case, run_vllm  # noqa: E402

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: loads in seconds
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

SETTINGS = {"enable_illava_vit": True, "illava_vit_k": "1-2", "illava_vit_r": 2}
CASES = {"qwen2_5_vl": ["image", "two_images", "tall_image", "video"],
         "qwen3_vl": ["image", "two_images", "tall_image", "video"]}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random Qwen2.5-VL and Qwen3-VL (vLLM's CPU attention needs heads of at least 32)."""
    root = tmp_path_factory.mktemp("vllm_models")
    built = {
        "qwen2_5_vl": tiny_qwen2_vl(vision_depth=4, text_layers=2, text_width=128,
                                    model_class="Qwen2_5_VLForConditionalGeneration"),
        "qwen3_vl": tiny_qwen3_vl(vision_depth=5, text_layers=2, text_width=128),
    }
    paths = {}
    for name, (model, processor) in built.items():
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
        processor.save_pretrained(paths[name])
    return paths


def in_own_process(model: str, settings, cases, env: dict | None = None, **engine) -> list[list]:
    request = json.dumps({"model": model, "settings": settings, "cases": cases, "engine": engine})
    done = subprocess.run([sys.executable, "-m", "tests.vllm_cases", request], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS "):])


def transformers_run(path: str, settings: dict | None, cases: list[str]) -> list[list]:
    """The same requests through transformers' generate, patched by illava with `settings`."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    model = getattr(transformers, config.architectures[0]).from_pretrained(path, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(path)
    if settings is not None:
        illava.apply(model, processor=processor, **settings)
    results = []
    for name in cases:
        prompt, data = case(name)
        extra = {}
        if "video" in data and "Qwen3" in type(processor).__name__:  # timestamps between frames
            extra["video_metadata"] = [VideoMetadata(total_num_frames=len(frames), fps=FPS,
                                                     frames_indices=list(range(len(frames))))
                                       for frames in data["video"]]
        inputs = processor(text=prompt, images=data.get("image"), videos=data.get("video"), return_tensors="pt",
                           **extra)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        new = out.sequences[0, inputs["input_ids"].shape[1]:]
        logprob = sum(torch.log_softmax(score[0].float(), -1)[token].item() for score, token in zip(out.scores, new))
        results.append([new.tolist(), logprob, int(inputs["input_ids"].shape[1])])
    return results


def assert_same(actual, expected, tolerance):
    for (tokens, logprob, length, *_), (want_tokens, want_logprob, want_length, *_) in zip(actual, expected,
                                                                                          strict=True):
        assert (tokens, length) == (want_tokens, want_length)
        assert logprob == pytest.approx(want_logprob, abs=tolerance)


@pytest.fixture(scope="module")
def merged(checkpoints):
    """vLLM with the plugin and the ViT stage on, every family's cases as one batch."""
    return {name: run_vllm(checkpoints[name], SETTINGS, CASES[name]) for name in CASES}


@pytest.mark.parametrize("family", sorted(CASES))
def test_without_settings_the_plugin_changes_nothing(checkpoints, family):
    with_plugin = run_vllm(checkpoints[family], None, CASES[family])
    without_plugins = in_own_process(checkpoints[family], None, CASES[family], env={"VLLM_PLUGINS": "none"})
    assert_same(with_plugin, without_plugins, tolerance=1e-5)


@pytest.mark.parametrize("family", sorted(CASES))
def test_the_vit_stage_in_vllm_matches_the_transformers_path(checkpoints, merged, family):
    expected = transformers_run(checkpoints[family], SETTINGS, CASES[family])
    unmerged = transformers_run(checkpoints[family], None, CASES[family])
    # merging happened: fewer placeholders, other log-probabilities
    assert all(got[2] < plain[2] for got, plain in zip(expected, unmerged))
    # vLLM and transformers differ by 3e-3 on the Qwen2.5-VL video unmerged already (their video resizing)
    tolerances = [1e-2 if (family, name) == ("qwen2_5_vl", "video") else 1e-4 for name in CASES[family]]
    for got, want, tolerance in zip(merged[family], expected, tolerances):
        assert_same([got], [want], tolerance)


def test_tensor_parallel_2_matches_1(checkpoints, merged):
    family = "qwen2_5_vl"
    parallel = in_own_process(checkpoints[family], SETTINGS, CASES[family], tensor_parallel_size=2,
                              env={"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    assert_same(parallel, merged[family], tolerance=1e-4)


@pytest.mark.parametrize("family", sorted(CASES))
def test_a_request_served_from_the_prefix_cache_gives_the_same(checkpoints, family):
    """The second time, the prompt's blocks with the image come from the cache and its encoder does not run: the
    text positions after it must not need the survivors' positions."""
    first, again = run_vllm(checkpoints[family], SETTINGS, ["long_tall_image"] * 2, one_by_one=True, block_size=32)
    assert first[3] == 0 and again[3] > 0  # served from the cache the second time
    assert_same([again], [first], tolerance=1e-5)


def test_a_qwen3_vl_video_cut_by_the_prefix_cache_or_a_prefill_chunk_gives_the_same(checkpoints):
    """The video's placeholders (timestamps, markers, survivors of every frame) split between steps: after a
    cached 32-token block (from the shorter request before it), and in chunks of 40 tokens."""
    path = checkpoints["qwen3_vl"]
    whole = run_vllm(path, SETTINGS, ["long_video"], block_size=32, enable_prefix_caching=False)
    _, cached = run_vllm(path, SETTINGS, ["video", "long_video"], one_by_one=True, block_size=32)
    assert cached[3] == 32  # the cache ends inside the video
    chunked = run_vllm(path, SETTINGS, ["long_video"], block_size=32, enable_prefix_caching=False,
                       enable_chunked_prefill=True, max_num_batched_tokens=40)
    assert_same([cached], whole, tolerance=1e-5)
    assert_same(chunked, whole, tolerance=1e-5)


def test_the_llm_stage_is_refused_by_name(checkpoints):
    with pytest.raises(Exception, match="enable_illava_llm"):
        run_vllm(checkpoints["qwen2_5_vl"], {**SETTINGS, "enable_illava_llm": True}, ["image"])


def test_an_r_that_leaves_no_window_is_named(checkpoints):
    with pytest.raises(Exception, match="illava_vit_r=50"):
        run_vllm(checkpoints["qwen2_5_vl"], {**SETTINGS, "illava_vit_r": 50}, ["image"])


def test_unknown_settings_are_named():
    from illava.vllm.qwen import settings_of

    config = type("Config", (), {"illava": {"enable_illava_vit": True, "illava_vit_rr": 3}})()
    with pytest.raises(ValueError, match="illava_vit_rr"):
        settings_of(config)
    assert settings_of(type("Config", (), {})()) is None
