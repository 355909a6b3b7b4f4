"""`run_inference_once.py` / `illava-run`: one input in (an image, a folder of images, or a video), the answer,
a merge report and merge-source heatmaps out.

    python run_inference_once.py --input_path photo.jpg --question "What is in the image?" \\
        --enable_illava_vit True --illava_vit_k 5-6-7-8 --illava_vit_r 92 --output_dir outputs/
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import api
from ..config import IllavaConfig
from ..registry import families, family_of_model_type, find_family
from ..report import merge_summary
from .measure import PeakMemory, stage_spans

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}
# processors that stamp each frame with its time (`<t seconds>`), from the frames' indices and the video's fps
DEFAULT_FPS = 24.0  # when the container does not say
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
logger = logging.getLogger(__name__)


class CliError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


@dataclass
class VideoTiming:
    fps: float
    total_frames: int
    frame_indices: list[int]  # of the sampled frames, in the whole video


@dataclass
class Visual:
    kind: str  # "image", "images" or "video"
    items: list = field(default_factory=list)  # PIL images, or one [frames, H, W, 3] uint8 array
    timing: VideoTiming | None = None  # of a video


def load_visual(path: str, max_frames: int) -> Visual:
    from PIL import UnidentifiedImageError

    source = Path(path)
    if not source.exists():
        raise CliError(f"--input_path {path!r} does not exist")
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise CliError(f"--input_path {path!r} is a folder without images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return Visual("images", [open_image(file) for file in files])
    if source.suffix.lower() in VIDEO_SUFFIXES:
        frames, timing = load_timed_video(source, max_frames)
        return Visual("video", [frames], timing)
    try:
        return Visual("image", [open_image(source)])
    except (UnidentifiedImageError, OSError) as error:
        raise CliError(f"--input_path {path!r} is neither a readable image nor a video ({error})") from None


def open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise CliError(f"cannot read image {str(path)!r}: {error}") from None


def load_video(path: Path, max_frames: int) -> np.ndarray:
    """`[frames, H, W, 3]` uint8, `max_frames` sampled uniformly; decord if installed, PyAV otherwise."""
    return load_timed_video(path, max_frames)[0]


def load_timed_video(path: Path, max_frames: int) -> tuple[np.ndarray, VideoTiming]:
    """`load_video`, and when the frames were taken."""
    try:
        import decord
    except ImportError:
        decord = None
    if decord is not None:
        try:
            reader = decord.VideoReader(str(path), num_threads=1)
            total = len(reader)
            if total == 0:
                raise CliError(f"video {str(path)!r} has no frames")
            indices = np.linspace(0, total - 1, min(max_frames, total)).round().astype(int)
            timing = VideoTiming(float(reader.get_avg_fps() or DEFAULT_FPS), total, indices.tolist())
            return reader.get_batch(list(indices)).asnumpy(), timing
        except (decord.DECORDError, RuntimeError) as error:  # decord raises RuntimeError for unreadable files
            raise CliError(f"cannot decode video {str(path)!r}: {error}") from None
    try:
        import av
    except ImportError:
        raise CliError("reading videos needs decord or PyAV: pip install 'illava[video]'") from None
    try:
        with av.open(str(path)) as container:
            rate = container.streams.video[0].average_rate
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except (av.error.FFmpegError, ValueError) as error:
        raise CliError(f"cannot decode video {str(path)!r}: {error}") from None
    if not frames:
        raise CliError(f"video {str(path)!r} has no frames")
    indices = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
    timing = VideoTiming(float(rate) if rate else DEFAULT_FPS, len(frames), indices.tolist())
    return np.stack([frames[index] for index in indices]), timing


def check_device_and_attention(device: str, attn_implementation: str, dtype: str) -> None:
    """Raise CliError when torch cannot use `device` here or `attn_implementation` (one of ATTN_IMPLEMENTATIONS,
    which argparse checks) cannot run on it in `dtype`: one line before the model loads rather than a traceback
    after. Shared by the CLI, the demo and the benchmark."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise CliError(f"--device {device!r} is not a device torch knows; use e.g. cpu, cuda or cuda:1") from None
    if parsed.type != "cpu":
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        if accelerator is None or accelerator.type != parsed.type:
            raise CliError(f"--device {device!r}: no {parsed.type} device is available here")
        if parsed.index is not None and parsed.index >= torch.accelerator.device_count():
            raise CliError(f"--device {device!r}: only {torch.accelerator.device_count()} {parsed.type} device(s) here")
    if attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise CliError("attention implementation 'flash_attention_2' needs the flash_attn package: "
                           "pip install 'illava[flash]', or use sdpa")
        if parsed.type != "cuda":
            raise CliError(f"attention implementation 'flash_attention_2' runs on CUDA, not --device {device!r}; "
                           "use sdpa")
        if dtype not in ("float16", "bfloat16"):
            raise CliError(f"attention implementation 'flash_attention_2' runs in float16 or bfloat16, not --dtype "
                           f"{dtype}; pass --dtype bfloat16 or use sdpa")


def question_text(question: str) -> str:
    """The reference implementation's command line writes questions as words joined by '-' or '_' ("What-is-in-the-image?"); plain text passes."""
    if any(character.isspace() for character in question):
        return question
    return question.replace("_", " ").replace("-", " ")


def load_model(args) -> tuple[torch.nn.Module, object, str]:
    """The model and processor, and a line saying what was loaded."""
    dtype = getattr(torch, args.dtype)
    if args.model_path is None:
        from .default_model import load_default_model

        try:
            model, processor = load_default_model(
                device=args.device, dtype=dtype, attn_implementation=args.attn_implementation
            )
        except FileNotFoundError as missing:
            raise CliError(f"{missing}; reinstall illava or pass --model_path") from None
        return model, processor, "the built-in default model (a small LLaVA-OneVision trained on generated scenes)"
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    path = Path(args.model_path)
    if not path.exists():
        raise CliError(f"--model_path {args.model_path!r} does not exist")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise CliError(f"--model_path {args.model_path!r} holds no loadable transformers config: {error}") from None
    if family_of_model_type(config.model_type) is None:
        supported = [model_type for family in families() for model_type in family.model_types]
        raise CliError(f"model type {config.model_type!r} is not supported; supported: {supported}")
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, attn_implementation=args.attn_implementation, local_files_only=True
    ).to(args.device).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model, processor, f"{config.model_type} from {args.model_path}"


def build_inputs(model, processor, visual: Visual, question: str, device: str, dtype: torch.dtype):
    kind = "video" if visual.kind == "video" else "image"
    content = [{"type": kind} for _ in visual.items] + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    media = {"videos": visual.items} if kind == "video" else {"images": [visual.items]}
    if model.config.model_type != "llava_onevision" and kind == "image":
        media = {"images": visual.items}
    if kind == "video" and find_family(model).timestamped_videos:
        from transformers.video_utils import VideoMetadata

        timing = visual.timing
        # the frames are sampled already (--max_frames_num); the processor only needs when each one was
        media.update(do_sample_frames=False, video_metadata=[VideoMetadata(
            total_num_frames=timing.total_frames, fps=timing.fps, frames_indices=timing.frame_indices)])
    inputs = processor(text=[prompt], return_tensors="pt", **media).to(device)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(dtype)
    return inputs


@dataclass
class RunResult:
    answer: str
    prompt_tokens: int
    vision_seconds: float
    prefill_seconds: float
    decode_seconds: float
    new_tokens: int
    peak_bytes: int
    report: list[str]


def run_once(model, processor, inputs, max_new_tokens: int, device: str) -> RunResult:
    """Greedy generation, timed: vision encoder, prefill (first LLM forward), decode (the rest)."""
    with torch.no_grad(), stage_spans(model, device) as spans, PeakMemory(device) as peak:
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = generated[0, inputs["input_ids"].shape[1]:]
    answer = processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    vision = sum(end - begin for begin, end in spans["vision"])
    prefill_start, prefill_end = spans["forward"][0]
    # generate() usually encodes images before its first forward; if not, take the encoder out of the prefill
    vision_inside = sum(end - begin for begin, end in spans["vision"] if begin >= prefill_start and end <= prefill_end)
    return RunResult(
        answer=answer,
        prompt_tokens=int(inputs["input_ids"].shape[1]),
        vision_seconds=vision,
        prefill_seconds=prefill_end - prefill_start - vision_inside,
        decode_seconds=sum(end - begin for begin, end in spans["forward"][1:]),
        new_tokens=int(new_tokens.numel()),
        peak_bytes=peak.bytes,
        report=merge_summary(model) if api.is_applied(model) else [],
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_inference_once.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model_path", help="a LLaVA-OneVision / Qwen2-VL / Qwen2.5-VL / Qwen3-VL(-MoE) / Qwen3.5 "
                                             "checkpoint folder (default: the built-in default model)")
    parser.add_argument("--input_path", required=True, help="an image, a folder of images, or a video file")
    parser.add_argument("--question", default="Describe the image.", help="plain text, or words joined by - or _")
    parser.add_argument("--max_frames_num", type=int, default=32)
    parser.add_argument("--mm_spatial_pool_stride", type=int, default=2,
                        help="LLaVA-OneVision video pooling stride: 2 pools frames 2x2 (transformers' default), 1 keeps "
                             "every token")
    parser.add_argument("--output_dir", default="outputs", help="where heatmaps are written")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--attn_implementation", default="sdpa", choices=ATTN_IMPLEMENTATIONS)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--compare", action="store_true", help="also run without merging and compare")
    defaults = IllavaConfig()
    for name in IllavaConfig.field_names():
        default = getattr(defaults, name)
        if isinstance(default, tuple):
            default = "-".join(map(str, default))
        parser.add_argument(f"--{name}", default=str(default), help=f"(default: {default})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # invalid iLLaVA settings for this model, named by illava
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def run(args) -> None:
    config = IllavaConfig.from_dict({name: getattr(args, name) for name in IllavaConfig.field_names()})
    if args.max_frames_num < 1:
        raise CliError(f"--max_frames_num {args.max_frames_num} must be at least 1")
    if args.mm_spatial_pool_stride < 1:
        raise CliError(f"--mm_spatial_pool_stride {args.mm_spatial_pool_stride} must be at least 1")
    if args.max_new_tokens < 1:
        raise CliError(f"--max_new_tokens {args.max_new_tokens} must be at least 1")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise CliError(f"--output_dir {args.output_dir!r} is a file, not a folder")
    check_device_and_attention(args.device, args.attn_implementation, args.dtype)
    visual = load_visual(args.input_path, args.max_frames_num)
    question = question_text(args.question)
    model, processor, description = load_model(args)
    if args.mm_spatial_pool_stride != 2:
        if model.config.model_type != "llava_onevision":
            raise CliError("--mm_spatial_pool_stride applies to LLaVA-OneVision's video pooling only")
        model.config.mm_spatial_pool_stride = args.mm_spatial_pool_stride  # read by illava.apply
    print(f"model: {description}")
    print(f"input: {args.input_path} ({visual.kind}); question: {question}")
    results, written = infer(
        model, processor, visual, question, config, device=args.device, dtype=getattr(torch, args.dtype),
        max_new_tokens=args.max_new_tokens, compare=args.compare, output_dir=args.output_dir,
    )
    print_report(results, written)


def infer(model, processor, visual: Visual, question: str, config: IllavaConfig, *, device: str,
          dtype: torch.dtype, max_new_tokens: int, compare: bool, output_dir: str | Path
          ) -> tuple[dict[str, RunResult], list[Path]]:
    """Answer with iLLaVA applied (and without it first, with `compare`); heatmaps when sources are tracked."""
    results = {}
    if compare:
        inputs = build_inputs(model, processor, visual, question, device, dtype)
        results["baseline"] = run_once(model, processor, inputs, max_new_tokens, device)
    api.apply(model, config, processor=processor)
    try:
        inputs = build_inputs(model, processor, visual, question, device, dtype)
        results["illava"] = run_once(model, processor, inputs, max_new_tokens, device)
        written = []
        if config.illava_track_vit_source or config.illava_track_llm_source:
            from ..visualize import write_heatmaps

            written = write_heatmaps(model, processor, inputs, api.last_trace(model), output_dir)
    finally:
        api.remove(model)
    return results, written


def print_report(results: dict[str, RunResult], written: list[Path]) -> None:
    for label, result in results.items():
        print(f"\n[{label}] answer: {result.answer}")
        for line in result.report:
            print(f"  {line}")
        decode_rate = result.new_tokens / result.decode_seconds if result.decode_seconds else float("nan")
        print(
            f"  prompt {result.prompt_tokens} tokens; vision encoder {result.vision_seconds * 1000:.1f} ms, "
            f"prefill {result.prefill_seconds * 1000:.1f} ms, decode {result.decode_seconds * 1000:.1f} ms "
            f"({decode_rate:.1f} tokens/s), peak memory {result.peak_bytes / 2**20:.1f} MiB"
        )
    if "baseline" in results:
        base, merged = results["baseline"], results["illava"]
        print(
            f"\nillava vs baseline: prompt {merged.prompt_tokens}/{base.prompt_tokens} tokens, "
            f"prefill x{_ratio(base.prefill_seconds + base.vision_seconds, merged.prefill_seconds + merged.vision_seconds)}"
            f" faster, peak memory x{_ratio(merged.peak_bytes, base.peak_bytes)} of baseline"
        )
    for path in written:
        print(f"heatmap: {path}")


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}" if denominator else "n/a"


if __name__ == "__main__":
    sys.exit(main())
