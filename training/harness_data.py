"""Held-out scenes and videos as the evaluation harnesses read their datasets, to score the built-in model with
unmodified VLMEvalKit and lmms-eval.

- VLMEvalKit: an image MCQ TSV (index, question, options A-E, answer letter, base64 PNG, category = question
  kind, a hint now and then), which VLMEvalKit loads from `$LMUData/<name>.tsv` as a custom MCQ dataset, asks
  with its own MCQ prompt and scores with `--judge exact_matching`.
- lmms-eval: JSON lines of images (base64 PNG) and of videos (MP4 files beside them), each with its question,
  lettered options and answers, read by the tasks in `tests/lmms_tasks/illava_scenes_*.yaml`.

The questions, answers and options are functions of (split, index), as the scenes are.

    python training/harness_data.py --vlmeval-tsv $LMUData/IllavaScenesMCQ.tsv --lmms-dir /tmp/scenes --count 200
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from training.scenes import ANSWERS, HINTS, OPTION_LETTERS, mcq_options, sample, sample_video  # noqa: E402

VLMEVAL_HINT_RATE = 0.25
IMAGES_FILE = "scenes_image.jsonl"
VIDEOS_FILE = "scenes_video.jsonl"
VIDEO_FPS = 4


def _png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _options(kind: str, answer: str, rng: random.Random) -> tuple[dict[str, str], str]:
    """Lettered options (a shuffled subset of the kind's answers) and the right one's letter."""
    options = mcq_options(rng, kind, answer)
    return dict(zip(OPTION_LETTERS, options)), OPTION_LETTERS[options.index(answer)]


def vlmeval_mcq_rows(split: str = "test", start: int = 0, count: int = 100) -> list[dict]:
    """VLMEvalKit MCQ rows for the image scenes `start .. start + count` of `split`."""
    rows = []
    for index in range(start, start + count):
        item = sample(split, index)
        rng = random.Random(f"illava-vlmeval-mcq/{split}/{index}")
        options, letter = _options(item.kind, item.answer, rng)
        hint = rng.choice(HINTS) if rng.random() < VLMEVAL_HINT_RATE else None
        rows.append({"index": index, "question": item.question, **options, "answer": letter, "hint": hint,
                     "image": _png(item.image), "category": item.kind})
    return rows


def write_vlmeval_mcq_tsv(path: Path, split: str = "test", start: int = 0, count: int = 100) -> Path:
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(vlmeval_mcq_rows(split, start, count))
    frame = frame[["index", "question", *OPTION_LETTERS, "answer", "hint", "image", "category"]]
    frame.to_csv(path, sep="\t", index=False)
    return path


def write_mp4(path: Path, frames: list, fps: int = VIDEO_FPS) -> Path:
    """Frames as an MPEG-4 part 2 file (in every PyAV build), at a quality that keeps the scenes' colours."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "1"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")))
        container.mux(stream.encode())  # flush the encoder
    return path


def _record(split: str, index: int, kind: str, question: str, answer: str, media: str) -> dict:
    rng = random.Random(f"illava-lmms/{media}/{split}/{index}")
    options, letter = _options(kind, answer, rng)
    return {"id": index, "kind": kind, "question": question, "answer_text": answer, "answer": letter,
            "options": options, "answer_set": list(ANSWERS[kind])}


def write_lmms_scenes(folder: Path, split: str = "test", start: int = 0, images: int = 100, videos: int = 48,
                      frames: int = 8) -> Path:
    """`IMAGES_FILE` and `VIDEOS_FILE` (plus one MP4 per video, of `frames` frames) in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / IMAGES_FILE, "w") as out:
        for index in range(start, start + images):
            item = sample(split, index)
            record = _record(split, index, item.kind, item.question, item.answer, "image")
            out.write(json.dumps({**record, "image": _png(item.image)}) + "\n")
    with open(folder / VIDEOS_FILE, "w") as out:
        for index in range(start, start + videos):
            item = sample_video(split, index, frames)
            name = f"video_{split}_{index}.mp4"
            write_mp4(folder / name, item.frames)
            record = _record(split, index, item.kind, item.question, item.answer, "video")
            out.write(json.dumps({**record, "video": name}) + "\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vlmeval-tsv", type=Path, help="write the VLMEvalKit MCQ TSV here")
    parser.add_argument("--lmms-dir", type=Path, help="write the lmms-eval JSON lines and videos here")
    parser.add_argument("--split", default="test")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=200, help="image scenes (and, for lmms-eval, videos)")
    parser.add_argument("--frames", type=int, default=8, help="frames per video")
    args = parser.parse_args(argv)
    if not (args.vlmeval_tsv or args.lmms_dir):
        parser.error("nothing to write: pass --vlmeval-tsv and/or --lmms-dir")
    if args.vlmeval_tsv:
        print(f"wrote {write_vlmeval_mcq_tsv(args.vlmeval_tsv, args.split, args.start, args.count)}")
    if args.lmms_dir:
        folder = write_lmms_scenes(args.lmms_dir, args.split, args.start, args.count, args.count, args.frames)
        print(f"wrote {folder / IMAGES_FILE} and {folder / VIDEOS_FILE}")


if __name__ == "__main__":
    main()
