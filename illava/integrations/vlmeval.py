"""VLMEvalKit integration: iLLaVA model entries for `vlmeval.config.supported_VLM`, and a launcher.

    python -m illava.integrations.vlmeval --data MMBench_DEV_EN --model Qwen2-VL-7B-Instruct-iLLaVA [run.py options]
    python -m illava.integrations.vlmeval --data MyMCQ --model Qwen2-VL-2B-Instruct-iLLaVA --model-path ./ckpt

VLMEvalKit has no plugin mechanism: the launcher adds the entries of `MODELS` to `supported_VLM` and then runs
VLMEvalKit's own `run.py` (beside the `vlmeval` package of a source checkout) in this process, with the remaining
arguments. `--model-path` points the iLLaVA models at another checkpoint (a local copy, a tiny test model) and
`--model-args '{"max_new_tokens": 16, "illava_options": {"enable_illava_llm": false}}'` overrides their `IllavaChat`
keywords and updates their iLLaVA options. Each run's settings are written to
`<work-dir>/<model>/illava_settings.json` beside VLMEvalKit's results. run.py logs a failed model x dataset
combination (a model that cannot be built, a dataset it cannot load or evaluate) and goes on; the launcher then
exits non-zero, naming what failed. VLMEvalKit's own wrappers
hard-code CUDA, flash-attention-2 and `nvidia-smi`; `IllavaChat` (LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL) and
`Qwen3VLIllavaChat` (Qwen3-VL, Qwen3-VL-MoE) load the transformers model, on the CPU or a GPU, and log a merge
report per sample into VLMEvalKit's log.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import runpy
import sys
from pathlib import Path
from typing import Any

try:
    import vlmeval
    from vlmeval.smp import get_logger
    from vlmeval.vlm.base import BaseModel
    from vlmeval.vlm.qwen2_vl.prompt import Qwen2VLPromptMixin
    from vlmeval.vlm.qwen3_vl.prompt import Qwen3VLPromptMixin
except ModuleNotFoundError as error:
    raise ImportError(
        f"illava.integrations.vlmeval needs VLMEvalKit ({error.name!r} is missing). VLMEvalKit is not on PyPI: "
        "git clone https://github.com/open-compass/VLMEvalKit && pip install -e VLMEvalKit"
    ) from error

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from ..api import apply
from ..tools.cli import load_video
from ..config import IllavaConfig
from ..tools.default_model import DEFAULT_MODEL_PATH, SUGGESTED_SETTINGS
from .checkpoints import check_checkpoint
from ..report import merge_reports

logger = get_logger("illava")  # under VLMEvalKit's "vlmeval" logger: its console and run-log handlers

QWEN2_VL_PIXELS = dict(min_pixels=1280 * 28 * 28, max_pixels=16384 * 28 * 28)  # VLMEvalKit's Qwen2-VL settings
QWEN2_VL_VIT = dict(enable_illava_vit=True, illava_vit_k="12-13-14-15", illava_vit_r=0.16)
QWEN2_VL_LLM = dict(enable_illava_llm=True, illava_llm_k="6-7-8", illava_llm_r=0.90)
LLAVA_OV = dict(  # the paper's image setting
    enable_illava_vit=True,
    illava_vit_k="5-6-7-8",
    illava_vit_r=92,
    enable_illava_llm=True,
    illava_llm_k="8",
    illava_llm_r=0.70,
)
QWEN3_VL = dict(  # the reference's VLMEvalKit setting of Qwen3-VL-8B-Instruct-iLLaVA, in illava's semantics
    enable_illava_vit=True,
    illava_vit_k="2-3-4-5-6-7-8",
    illava_vit_r=0.15,  # the reference's 0.85 is the fraction of windows kept per layer; illava's is merged away
    illava_vit_mode="pivot",  # the reference's mode 3
    enable_illava_llm=True,
    illava_llm_k="19-21-23-25",
    illava_llm_r=0.70,  # a kept fraction in both
    illava_llm_mode="pivot",
    illava_pc_ratio=0.05,
)
OCRBENCH_MIN_PIXELS = 10 * 10 * 32 * 32  # Qwen3VLChat's floor for OCRBench images


class IllavaChat(Qwen2VLPromptMixin, BaseModel):
    """A VLMEvalKit model (`generate_inner(message, dataset)`) for LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL
    checkpoints in the transformers format, with iLLaVA applied; CPU or GPU.

    `illava_options`: the iLLaVA options (`IllavaConfig` names). `use_custom_prompt`: Qwen2-VL's dataset prompts, as in
    VLMEvalKit's `Qwen2VLChat` (on for Qwen2-VL there, off for Qwen2.5-VL). `min_pixels` / `max_pixels` go to
    the Qwen2-VL processor. `nframe`: frames sampled per video. Other keywords are generation settings.
    """

    INSTALL_REQ = False
    INTERLEAVE = True
    VIDEO_LLM = True
    model_types = ("llava_onevision", "qwen2_vl", "qwen2_5_vl")

    def __init__(
        self,
        model_path: str,
        illava_options: dict[str, Any] | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        use_custom_prompt: bool = False,
        system_prompt: str | None = None,
        nframe: int = 8,
        max_new_tokens: int = 2048,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        use_vllm: bool = False,
        **generate_kwargs: Any,
    ) -> None:
        super().__init__(use_custom_prompt=use_custom_prompt)
        if use_vllm:
            raise ValueError("iLLaVA patches transformers models; --use-vllm is not supported")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        check_checkpoint(model_path, "model_path")
        model_type = AutoConfig.from_pretrained(model_path).model_type
        if model_type not in self.model_types:
            loaders = [chat.__name__ for chat in (IllavaChat, Qwen3VLIllavaChat) if model_type in chat.model_types]
            raise ValueError(
                f"{type(self).__name__} loads {' / '.join(self.model_types)} checkpoints; model_path={model_path!r} "
                f"has model_type {model_type!r}" + (f" ({loaders[0]} loads it)" if loaders else "")
            )
        pixels = {key: value for key, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if value}
        self.processor = AutoProcessor.from_pretrained(model_path, **pixels)
        self.model = (
            AutoModelForImageTextToText.from_pretrained(
                model_path, dtype=dtype, attn_implementation=attn_implementation
            )
            .to(device)
            .eval()
        )
        self.illava_config = IllavaConfig.from_dict(illava_options or {})
        apply(self.model, self.illava_config, processor=self.processor)
        self.system_prompt = system_prompt
        self.nframe = nframe
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, **generate_kwargs}
        logger.info("iLLaVA on %s (%s): %s", type(self.model).__name__, device, self.illava_config.summary())

    def _chat(self, content: list[dict[str, Any]]) -> str:
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        messages.append({"role": "user", "content": content})
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _inputs(self, message: list[dict[str, Any]], dataset: str | None):
        """The processor's output for one VLMEvalKit message (text / image path / video path items)."""
        content: list[dict[str, Any]] = []
        images, videos = [], []
        for item in message:
            if item["type"] == "text":
                content.append({"type": "text", "text": item["value"]})
            elif item["type"] == "image":
                content.append({"type": "image"})
                with Image.open(item["value"]) as image:
                    images.append(image.convert("RGB"))
            else:
                content.append({"type": "video"})
                videos.append(load_video(Path(item["value"]), self.nframe))
        return self.processor(
            text=[self._chat(content)], images=images or None, videos=videos or None, return_tensors="pt"
        )

    def generate_inner(self, message: list[dict[str, Any]], dataset: str | None = None) -> str:
        inputs = self._inputs(message, dataset).to(self.model.device, self.model.dtype)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **self.generate_kwargs)
        report = merge_reports(self.model, inputs["input_ids"])[0]
        logger.info("iLLaVA visual tokens per stage: %s", report["visual_tokens"])
        return self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]


class Qwen3VLIllavaChat(Qwen3VLPromptMixin, IllavaChat):
    """`IllavaChat` for Qwen3-VL and Qwen3-VL-MoE, with the inputs VLMEvalKit's `Qwen3VLChat` builds: qwen-vl-utils
    sizes each image within `min_pixels` / `max_pixels` (its own defaults where None; OCRBench images at least
    `OCRBENCH_MIN_PIXELS`) and samples each video at `fps` frames a second, or `nframe` frames when `fps` is None
    (an item's own `fps` / `nframes` first; `total_pixels` caps a video's pixels). The processor takes them as they
    are, with each video's fps and frame indices for its `<t seconds>` timestamps. `use_custom_prompt`: Qwen3-VL's
    dataset prompts (off in VLMEvalKit's Qwen3-VL entries). Other keywords as `IllavaChat`.
    """

    model_types = ("qwen3_vl", "qwen3_vl_moe")

    def __init__(
        self,
        model_path: str,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        total_pixels: int | None = None,
        fps: float | None = 2,
        nframe: int = 128,
        use_custom_prompt: bool = False,
        **keywords: Any,
    ) -> None:
        super().__init__(model_path, use_custom_prompt=use_custom_prompt, nframe=nframe, **keywords)
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.total_pixels = total_pixels
        self.fps = fps

    def _inputs(self, message: list[dict[str, Any]], dataset: str | None):
        from qwen_vl_utils import process_vision_info

        content = [
            {"type": "text", "text": item["value"]} if item["type"] == "text" else self._vision_element(item, dataset)
            for item in message
        ]
        images, videos, video_options = process_vision_info(
            [{"role": "user", "content": content}],
            return_video_kwargs=True,
            image_patch_size=self.processor.image_processor.patch_size,
            return_video_metadata=True,
        )
        media = {"images": images, "do_resize": False, **video_options}  # sized already, frames sampled already
        if videos:
            frames, metadata = zip(*videos)
            media.update(videos=list(frames), video_metadata=list(metadata))
        return self.processor(text=[self._chat(content)], return_tensors="pt", **media)

    def _vision_element(self, item: dict[str, Any], dataset: str | None) -> dict[str, Any]:
        """A qwen-vl-utils content element for a VLMEvalKit image or video item (a video: a path or frame paths)."""
        if item["type"] == "image":
            min_pixels = OCRBENCH_MIN_PIXELS if dataset == "OCRBench" else self.min_pixels
            element = {"type": "image", "image": item["value"], "min_pixels": min_pixels, "max_pixels": self.max_pixels}
            passed = ("min_pixels", "max_pixels", "resized_height", "resized_width")
        elif item["type"] == "video":
            element = {
                "type": "video",
                "video": item["value"],
                "min_pixels": self.min_pixels,
                "max_pixels": self.max_pixels,
                "total_pixels": self.total_pixels,
            }
            passed = ("resized_height", "resized_width", "fps", "nframes", "sample_fps")
        else:
            raise ValueError(f"message item of type {item['type']!r}: Qwen3-VL takes text, image and video items")
        element.update((key, item[key]) for key in passed if item.get(key) is not None)
        if element["type"] == "video" and isinstance(element["video"], str) and not {"fps", "nframes"} & set(element):
            if self.fps is not None:
                element["fps"] = self.fps
            else:  # qwen-vl-utils refuses more frames than the video has, and odd counts
                import decord  # a VLMEvalKit requirement, not on every platform

                frames = len(decord.VideoReader(element["video"]))
                element["nframes"] = min(self.nframe, frames - frames % 2)
        return {key: value for key, value in element.items() if value is not None}


def _entry(model_path: str, options: dict[str, Any], chat: type = IllavaChat, **keywords: Any) -> functools.partial:
    return functools.partial(chat, model_path=model_path, illava_options=options, **keywords)


QWEN2_VL_BOTH = {**QWEN2_VL_VIT, **QWEN2_VL_LLM}
MODELS: dict[str, functools.partial] = {
    "Qwen2-VL-7B-Instruct-iLLaVA": _entry(
        "Qwen/Qwen2-VL-7B-Instruct", QWEN2_VL_BOTH, use_custom_prompt=True, **QWEN2_VL_PIXELS
    ),
    "Qwen2-VL-2B-Instruct-iLLaVA": _entry(
        "Qwen/Qwen2-VL-2B-Instruct", QWEN2_VL_VIT, use_custom_prompt=True, **QWEN2_VL_PIXELS
    ),
    "Qwen2.5-VL-7B-Instruct-iLLaVA": _entry("Qwen/Qwen2.5-VL-7B-Instruct", QWEN2_VL_BOTH, **QWEN2_VL_PIXELS),
    "llava-onevision-qwen2-7b-ov-hf-iLLaVA": _entry("llava-hf/llava-onevision-qwen2-7b-ov-hf", LLAVA_OV),
    "llava-onevision-qwen2-0.5b-ov-hf-iLLaVA": _entry("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", LLAVA_OV),
    # pixels, frames and prompts as VLMEvalKit's own Qwen3-VL entries (Qwen3VLChat's defaults, no custom prompts)
    "Qwen3-VL-8B-Instruct-iLLaVA": _entry("Qwen/Qwen3-VL-8B-Instruct", QWEN3_VL, Qwen3VLIllavaChat),
    "Qwen3-VL-2B-Instruct-iLLaVA": _entry("Qwen/Qwen3-VL-2B-Instruct", QWEN3_VL, Qwen3VLIllavaChat),
    # the built-in demo model, unmerged and with its suggested settings: a harness run needs no download
    "illava-tiny-ov-scenes": _entry(str(DEFAULT_MODEL_PATH), {"enable_illava_vit": False, "enable_illava_llm": False}),
    "illava-tiny-ov-scenes-iLLaVA": _entry(str(DEFAULT_MODEL_PATH), SUGGESTED_SETTINGS),
}


SETTINGS_FILE = "illava_settings.json"


def entries(model_path: str | None = None, model_args: dict[str, Any] | None = None) -> dict[str, functools.partial]:
    """The iLLaVA entries with `model_path` replacing each checkpoint and `model_args` updating its `IllavaChat`
    keywords (e.g. `{"max_new_tokens": 16, "device": "cpu"}`); iLLaVA options go under `"illava_options"` and
    update the entry's own (`{"illava_options": {"enable_illava_llm": false}}` turns one stage off). Every value
    is checked here, before any model loads."""
    if model_args is not None and not isinstance(model_args, dict):
        raise ValueError(f"--model-args={json.dumps(model_args)} must be a JSON object of IllavaChat keywords")
    overrides = dict(model_args or {})
    misplaced = sorted(set(overrides) & set(IllavaConfig.field_names()))
    if misplaced:
        raise ValueError(
            f"--model-args: {misplaced} are iLLaVA options; put them under \"illava_options\", e.g. "
            f"'{{\"illava_options\": {{\"{misplaced[0]}\": ...}}}}'"
        )
    options = overrides.pop("illava_options", None) or {}
    if not isinstance(options, dict):
        raise ValueError(f"--model-args: illava_options={options!r} must be a JSON object of iLLaVA options")
    if model_path:
        overrides["model_path"] = check_checkpoint(model_path, "--model-path")
    result = {}
    for name, entry in MODELS.items():
        keywords = {**entry.keywords, **overrides}
        keywords["illava_options"] = {**entry.keywords["illava_options"], **options}
        IllavaConfig.from_dict(keywords["illava_options"])  # a bad value fails now, naming itself
        result[name] = functools.partial(entry.func, **keywords)
    return result


def register(model_path: str | None = None, model_args: dict[str, Any] | None = None) -> dict[str, functools.partial]:
    """Add the iLLaVA entries (see `entries`) to `vlmeval.config.supported_VLM`."""
    from vlmeval.config import supported_VLM

    registered = entries(model_path, model_args)
    supported_VLM.update(registered)
    return registered


def record_settings(registered: dict[str, functools.partial], run_arguments: list[str]) -> None:
    """Write each iLLaVA model's settings to `<work-dir>/<model>/illava_settings.json`, beside VLMEvalKit's results.

    VLMEvalKit reuses the predictions it finds under a model's name, so a work dir that holds results of the same
    model with other settings is refused rather than silently mixed in."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--model", nargs="+", default=[])
    parser.add_argument("--work-dir", default="./outputs")  # run.py's default
    known, _ = parser.parse_known_args(run_arguments)
    for name in known.model:
        if name not in registered:
            continue
        entry = registered[name].keywords
        config = IllavaConfig.from_dict(entry["illava_options"])
        settings = json.loads(json.dumps({"model_path": entry["model_path"], "illava": config.to_dict()}))
        folder = Path(known.work_dir) / name
        path = folder / SETTINGS_FILE
        if path.is_file() and json.loads(path.read_text()) != settings:
            raise SystemExit(
                f"illava: {folder} holds results of {name} made with other settings ({path}); VLMEvalKit would "
                "reuse those predictions. Pass another --work-dir, or delete that folder"
            )
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2) + "\n")
        logger.info("iLLaVA settings of %s (also in %s): %s", name, path, config.summary())


def run_script() -> Path:
    """VLMEvalKit's `run.py`: it sits in the source checkout, beside the `vlmeval` package."""
    path = Path(vlmeval.__file__).resolve().parent.parent / "run.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"VLMEvalKit's run.py is not at {path}; install VLMEvalKit from a source checkout (pip install -e)"
        )
    return path


RUN_NAME = "__main__"  # run.py's __name__: it logs through `get_logger(__name__)`


class _RunFailures(logging.Handler):
    """Collects the errors run.py logs: a failed model x dataset combination, a dataset it cannot load or
    evaluate. It logs each and goes on, so its exit status does not tell."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _launcher_console():
    """The launcher's own log lines on the console, as run.py's console shows VLMEvalKit's: they come before run.py
    sets up VLMEvalKit's logging (`setup_logger`), and until then the "vlmeval" logger has no handlers and drops
    INFO lines (its level is unset: the root logger's WARNING)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        logging.Formatter("[%(asctime)s] %(levelname)s - %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    )
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False  # not also to the root handler that importing vlmeval sets up (logging.basicConfig)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)  # from here on run.py's handlers show them
        logger.setLevel(level)
        logger.propagate = propagate


def main(argv: list[str] | None = None) -> None:
    """Register, then run VLMEvalKit's run.py with the other arguments; exit non-zero when run.py logs a failure."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --help reaches run.py
    parser.add_argument("--model-path", help="load this checkpoint for the iLLaVA models")
    parser.add_argument("--model-args", type=json.loads, help="JSON object of IllavaChat keywords for them")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    with _launcher_console():
        try:
            registered = register(args.model_path, args.model_args)
        except ValueError as error:
            raise SystemExit(f"illava: {error}") from None
        record_settings(registered, rest)
    script = run_script()
    sys.argv = [str(script), *rest]
    failures = _RunFailures()
    run_logger = get_logger(RUN_NAME)
    run_logger.addHandler(failures)
    try:
        runpy.run_path(str(script), run_name=RUN_NAME)
    finally:
        run_logger.removeHandler(failures)
    if failures.messages:
        raise SystemExit("illava: VLMEvalKit's run.py failed: " + "; ".join(failures.messages))


if __name__ == "__main__":
    main()
