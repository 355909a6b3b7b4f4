"""Procedural scenes with templated questions whose answers are known, for training and scoring a tiny VLM.

A scene is a 224x224 image: a low-contrast textured background, small grey clutter (dots, short strokes), a few
grey "decoy" shapes and 1-4 brightly coloured shapes. Every question is about the coloured shapes and is built
together with its scene, so its answer is uniformly distributed over its answer set and the question text says
nothing about it (text-only accuracy is chance):

- colour: "What is the object's colour?"            -> red / green / blue / yellow / purple (one coloured shape)
- shape:  "What is the coloured object's shape?"    -> circle / square / triangle / star / cross
- where:  "What is its position?"                   -> left / right / top / bottom (it sits in that zone)
- count:  "How many coloured objects? Give the count." -> 1 / 2 / 3 / 4 (grey decoys do not count)

Reading them needs what merging can destroy: a coloured shape is 2-3 patches of 16 px across among 196 patches
of texture, clutter and decoys of the same forms, so a method that drops or blurs the wrong tokens loses its
colour, its outline, its position or one of several shapes.

Everything is a function of (split, index, difficulty): `sample("test", 7)` is the same scene on every machine.
`difficulty` in [0, 1] scales the number of decoys and clutter and shrinks shapes from large to their final
size; training ramps it up (a curriculum), held-out scenes use the full difficulty 1.

Videos (`sample_video`) are scenes whose one coloured shape moves in a straight line across 4-8 frames over a
still background, with questions about its direction (left / right / up / down), colour and shape.

Evaluation harnesses ask their own way (`in_format`): VLMEvalKit's multiple-choice prompt ("Question: ...\nOptions:\n
A. ...") and lmms-eval's short-answer and multiple-choice suffixes, answered by a word (the option's text); the
options are a shuffled subset of the answer set (`mcq_options`).
"""

from __future__ import annotations

import dataclasses
import math
import random
import re

import numpy as np
from PIL import Image, ImageDraw

SIZE = 224
SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 25),
    "purple": (145, 50, 185),
}
ZONES = ("left", "right", "top", "bottom")
COUNTS = (1, 2, 3, 4)
DIRECTIONS = ("left", "right", "up", "down")
KINDS = ("colour", "shape", "where", "count")
VIDEO_KINDS = ("direction", "colour", "shape")
# Every template ends in its kind's key word and a full stop or question mark, and no template holds another kind's
# key word: a small language model tells the kinds apart by one token at a fixed distance before its answer.
TEMPLATES = {
    "colour": ("What is the object's colour?", "Name its colour.", "Which is its colour?"),
    "shape": ("What is the coloured object's shape?", "Name its shape.", "Which is its shape?"),
    "where": ("Where is the coloured object? Give its position.", "Name its position.", "What is its position?"),
    "count": ("How many coloured objects? Give the count.", "Name their count.", "What is their count?"),
    "direction": ("Which way does the coloured object move? Give its direction.", "Name its direction.",
                  "What is its direction?"),
}
ANSWERS = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "where": ZONES,
    "count": tuple(str(count) for count in COUNTS),
    "direction": DIRECTIONS,
}
# Whole words the tokenizer keeps as single tokens (on top of its bytes): every answer is then one token, and so
# is every key word of a question.
VOCABULARY = (*SHAPES, *COLOURS, *ZONES, "up", "down", "coloured", "colour", "shape", "position", "count", "direction")
_RADIUS = (15, 22)  # shape half-size in pixels at full difficulty: 2-3 patches of 16 px across
_EASY_RADIUS = (24, 30)  # at difficulty 0
# LLaVA-OneVision pools video frames 2x2 (32 px cells): the moving shape stays 1-2 cells across
_VIDEO_RADIUS = (19, 25)
_TRAVEL = (80, 120)  # pixels the moving shape covers from the first frame to the last: 2.5-4 pooled cells
_PATH_CHECKS = 9  # decoys keep clear of the moving shape at this many points of its path (at most 15 px apart)
_MARGIN = 4
_SCALE = 2  # scenes are drawn at twice their size and downsampled
LOCATION_BINS = 7  # a video frame's 14x14 patches pool 2x2 into 7x7 cells

# What the harnesses send (VLMEvalKit: its MCQ datasets' `build_prompt`; lmms-eval: common task suffixes and
# its LLaVA models' system turn)
SYSTEM_PROMPT = "You are a helpful assistant."
PROMPT_FORMATS = ("own", "vlmeval_mcq", "lmms_short", "lmms_mc")
OPTION_LETTERS = "ABCDE"
LMMS_SHORT_ANSWER = "Answer the question using a single word or phrase."
LMMS_LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
VLMEVAL_INSTRUCTION = "Please select the correct answer from the options above. \n"
# MMBench-style context lines; no question kind's key word, so they say nothing about what is asked
HINTS = ("Ignore the grey decoys.", "Look closely at the picture.", "The picture is generated.")
_HINT_RATE = 0.25


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    colour: str | None  # None: a grey decoy
    x: float
    y: float
    radius: float
    angle: float
    grey: tuple[int, int, int] = (128, 128, 128)  # the decoy's tone


@dataclasses.dataclass(frozen=True)
class Question:
    kind: str
    text: str
    answer: str
    options: tuple[str, ...] = ()  # those offered by a multiple-choice prompt (the answer is one of them)


@dataclasses.dataclass
class Sample:
    """A scene and its main question (answer uniform over its answer set), plus the other questions the same
    scene answers (their answers follow the scene, not a design)."""

    image: Image.Image
    question: str
    answer: str
    kind: str
    shapes: list[Shape]
    more_questions: list[Question]

    @property
    def coloured(self) -> list[Shape]:
        return [shape for shape in self.shapes if shape.colour is not None]


@dataclasses.dataclass
class VideoSample:
    """A video (its frames), its main question (answer uniform over its answer set) and the other questions it
    answers: one coloured shape that moves in a straight line, grey decoys and clutter that stay."""

    frames: list[Image.Image]
    question: str
    answer: str
    kind: str
    more_questions: list[Question]


def sample(split: str, index: int, difficulty: float = 1.0) -> Sample:
    """The scene, question and answer number `index` of `split` ("train", "test", ...); deterministic."""
    rng = random.Random(f"illava-scenes/{split}/{index}")
    kind = KINDS[index % len(KINDS)]
    scene = _Scene(rng, difficulty)
    coloured = _coloured_shapes(scene, kind)
    decoys = [(rng.choice(SHAPES), None) for _ in range(scene.count(1, 3))]
    shapes = _place(scene, decoys, placed=coloured)
    image = _render(shapes, scene)
    answers = _answers(coloured)
    question = rng.choice(TEMPLATES[kind])
    more = [Question(other, rng.choice(TEMPLATES[other]), answer) for other, answer in answers.items() if other != kind]
    rng.shuffle(more)
    return Sample(image, question, answers[kind], kind, shapes, more)


def sample_video(split: str, index: int, frames: int = 8, difficulty: float = 1.0) -> VideoSample:
    """The video, question and answer number `index` of `split`, in `frames` frames; deterministic.

    The scene, the motion and the questions do not depend on `frames`: the same video sampled more or less often.
    """
    rng = random.Random(f"illava-videos/{split}/{index}")
    kind = VIDEO_KINDS[index % len(VIDEO_KINDS)]
    scene = _Scene(rng, difficulty, final_radius=_VIDEO_RADIUS)
    mover = Shape(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), 0.0, 0.0, scene.radius(), rng.uniform(0, 2 * math.pi))
    direction = rng.choice(DIRECTIONS)
    start, end = _move(rng, direction, mover.radius, rng.uniform(*_TRAVEL))
    decoys = [(rng.choice(SHAPES), None) for _ in range(scene.count(1, 3))]
    clear_of = _along(mover, start, end, _PATH_CHECKS)
    still = _place(scene, decoys, placed=clear_of)[len(clear_of):]  # clear of the whole path, whatever `frames`
    backdrop = _backdrop(scene)
    images = [_draw(backdrop, [*still, position]) for position in _along(mover, start, end, frames)]
    answers = {"direction": direction, "colour": mover.colour, "shape": mover.kind}
    question = rng.choice(TEMPLATES[kind])
    more = [Question(other, rng.choice(TEMPLATES[other]), answer) for other, answer in answers.items() if other != kind]
    rng.shuffle(more)
    return VideoSample(images, question, answers[kind], kind, more)


def _move(rng: random.Random, direction: str, radius: float, travel: float) -> tuple[tuple[float, float], ...]:
    """The first and last centre of a straight `travel`-pixel move in `direction` that stays inside the image.

    The start is uniform over where the move fits, so the average position says nothing about the direction."""
    low, high = radius + _MARGIN, SIZE - radius - _MARGIN
    along, across = rng.uniform(low, high - travel), rng.uniform(low, high)
    if direction in ("left", "up"):
        along = SIZE - along
    finish = along + (travel if direction in ("right", "down") else -travel)
    if direction in ("left", "right"):
        return (along, across), (finish, across)
    return (across, along), (across, finish)


def _along(shape: Shape, start: tuple[float, float], end: tuple[float, float], count: int) -> list[Shape]:
    """`shape` at `count` evenly spaced centres from `start` to `end`."""
    return [dataclasses.replace(shape, x=start[0] + (end[0] - start[0]) * step / (count - 1),
                                y=start[1] + (end[1] - start[1]) * step / (count - 1)) for step in range(count)]


def mcq_options(rng: random.Random, kind: str, answer: str) -> list[str]:
    """Multiple-choice options for a `kind` question: a shuffled subset of its answer set (2 to all of it) that
    holds `answer`, at a uniform position."""
    others = [other for other in ANSWERS[kind] if other != answer]
    options = [answer, *rng.sample(others, rng.randint(1, len(others)))]
    rng.shuffle(options)
    return options


def mcq_choice(text: str, options: tuple[str, ...]) -> str | None:
    """The option a multiple-choice answer picks, as VLMEvalKit's exact matching (`can_infer`) reads it: the one
    standalone option letter it gives, else the one option whose text it contains; None when neither is unique."""
    letters = OPTION_LETTERS[: len(options)]
    found = set(re.findall(rf"\b([{letters}])\b", text))
    if len(found) == 1:
        return found.pop()
    named = [letter for letter, option in zip(letters, options) if option.lower() in text.lower()]
    return named[0] if len(named) == 1 and not found else None


def in_format(question: Question, prompt_format: str, rng: random.Random) -> Question:
    """`question` as the harness of `prompt_format` (one of `PROMPT_FORMATS`) asks it, with the answer it scores:
    the question's own text and answer word ("own"), lmms-eval's short-answer suffix ("lmms_short"), or lettered
    options, answered with the right option's text (VLMEvalKit's "vlmeval_mcq", with a hint line now and then;
    "lmms_mc")."""
    if prompt_format == "own":
        return question
    if prompt_format == "lmms_short":
        return Question(question.kind, f"{question.text}\n{LMMS_SHORT_ANSWER}", question.answer)
    options = mcq_options(rng, question.kind, question.answer)
    # answered with the option's text: the harnesses read the option from it (`mcq_choice`), and a 4-layer decoder
    # did not learn to look the right letter up in training (see training/logs)
    answer = question.answer
    lines = [f"{option_letter}. {option}" for option_letter, option in zip(OPTION_LETTERS, options)]
    if prompt_format == "lmms_mc":
        return Question(question.kind, "\n".join([question.text, *lines, LMMS_LETTER_ANSWER]), answer, tuple(options))
    if prompt_format == "vlmeval_mcq":
        hint = f"Hint: {rng.choice(HINTS)}\n" if rng.random() < _HINT_RATE else ""
        options_text = "".join(f"{line}\n" for line in lines)
        text = f"{hint}Question: {question.text}\nOptions:\n{options_text}{VLMEVAL_INSTRUCTION}"
        return Question(question.kind, text, answer, tuple(options))
    raise ValueError(f"unknown prompt format {prompt_format!r}; expected one of {PROMPT_FORMATS}")


def _coloured_shapes(scene: _Scene, kind: str) -> list[Shape]:
    """The coloured shapes, drawn so that the answer to a `kind` question is uniform over its answer set."""
    rng = scene.rng
    count = rng.choice(COUNTS) if kind == "count" else 1
    shapes: list[Shape] = []
    if kind == "where" or (count == 1 and rng.random() < 0.5):
        radius = scene.radius()
        x, y = _zone_point(rng, rng.choice(ZONES), radius)
        shapes.append(Shape(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), x, y, radius, rng.uniform(0, 2 * math.pi)))
    items = [(rng.choice(SHAPES), rng.choice(tuple(COLOURS))) for _ in range(count - len(shapes))]
    return _place(scene, items, placed=shapes)


def _answers(coloured: list[Shape]) -> dict[str, str]:
    """Every question kind this scene answers unambiguously."""
    answers = {"count": str(len(coloured))}
    if len(coloured) == 1:
        (shape,) = coloured
        answers.update(colour=shape.colour, shape=shape.kind)
        zone = _zone_of(shape.x, shape.y)
        if zone is not None:
            answers["where"] = zone
    return answers


def patch_labels(item: Sample, patch: int) -> np.ndarray:
    """`[patches, 7]` dense targets for pretraining a vision tower, one row per patch in raster order.

    A patch belongs to the shape whose core (0.8 of its radius) covers its centre. Columns: the colour (1..
    `COLOURS`), shape (1.. `SHAPES`) and zone (1.. `ZONES`) of the coloured shape it belongs to (0 elsewhere, decoys
    included: an average over all tokens then reads the coloured shapes alone), the form of any shape it belongs
    to, decoys included (more outlines to learn from; 0 elsewhere), the number of coloured shapes in the scene
    (0-3 for 1-4) on every patch, and the column and row (1.. `LOCATION_BINS`) of the pooled cell a coloured
    shape's patch lies in (0 elsewhere): its tokens then say where they are, also pooled, frame by frame in a video.
    """
    side = SIZE // patch
    centres = (np.arange(side) + 0.5) * patch
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    cells = (np.arange(side) * LOCATION_BINS // side) + 1
    rows, columns = np.meshgrid(cells, cells, indexing="ij")
    labels = np.zeros((side, side, 7), dtype=np.int64)
    labels[..., 4] = len(item.coloured) - 1
    for shape in item.shapes:
        covered = np.hypot(xs - shape.x, ys - shape.y) < 0.8 * shape.radius
        labels[covered, 3] = SHAPES.index(shape.kind) + 1
        if shape.colour is not None:
            zone = _zone_of(shape.x, shape.y)
            labels[covered, 0] = tuple(COLOURS).index(shape.colour) + 1
            labels[covered, 1] = SHAPES.index(shape.kind) + 1
            labels[covered, 2] = ZONES.index(zone) + 1 if zone else 0
            labels[covered, 5] = columns[covered]
            labels[covered, 6] = rows[covered]
    return labels.reshape(side * side, 7)


class _Scene:
    """The random stream of one scene and the sizes its difficulty implies."""

    def __init__(self, rng: random.Random, difficulty: float, final_radius: tuple[float, float] = _RADIUS):
        if not 0.0 <= difficulty <= 1.0:
            raise ValueError(f"difficulty={difficulty} must lie in [0, 1]")
        self.rng = rng
        self.difficulty = difficulty
        self.final_radius = final_radius

    def count(self, low: int, high: int) -> int:
        """How many decoys (or clutter marks): `low..high` at full difficulty, none at difficulty 0."""
        return self.rng.randint(round(low * self.difficulty), round(high * self.difficulty))

    def radius(self) -> float:
        low, high = (easy + (hard - easy) * self.difficulty for easy, hard in zip(_EASY_RADIUS, self.final_radius))
        return self.rng.uniform(low, high)


def _zone_point(rng: random.Random, zone: str, radius: float) -> tuple[float, float]:
    """A centre clearly inside one of four zones: the outer third along one axis, the middle along the other."""
    outer = rng.uniform(radius + _MARGIN, max(radius + _MARGIN, SIZE / 3 - radius / 2))
    middle = rng.uniform(SIZE * 0.3, SIZE * 0.7)
    return {
        "left": (outer, middle),
        "right": (SIZE - outer, middle),
        "top": (middle, outer),
        "bottom": (middle, SIZE - outer),
    }[zone]


def _zone_of(x: float, y: float) -> str | None:
    """The zone a centre lies in, if any: the region `_zone_point` draws from."""
    middle = SIZE * 0.3 <= y <= SIZE * 0.7, SIZE * 0.3 <= x <= SIZE * 0.7
    if middle[0] and x < SIZE / 3:
        return "left"
    if middle[0] and x > SIZE * 2 / 3:
        return "right"
    if middle[1] and y < SIZE / 3:
        return "top"
    if middle[1] and y > SIZE * 2 / 3:
        return "bottom"
    return None


def _place(scene: _Scene, items: list[tuple[str, str | None]], placed: list[Shape] | None = None) -> list[Shape]:
    """Non-overlapping positions for `items` (rejection sampling; shrinks shapes if the scene gets crowded)."""
    rng = scene.rng
    shapes = list(placed or [])
    for kind, colour in items:
        radius = scene.radius()
        tone = rng.randint(80, 170)
        grey = (tone, tone - rng.randint(0, 20), tone - rng.randint(0, 30))
        for attempt in range(400):
            r = radius * (1.0 - 0.5 * attempt / 400)
            x = rng.uniform(r + _MARGIN, SIZE - r - _MARGIN)
            y = rng.uniform(r + _MARGIN, SIZE - r - _MARGIN)
            if all(math.hypot(x - s.x, y - s.y) > (r + s.radius) * 1.15 + 2 for s in shapes):
                shapes.append(Shape(kind, colour, x, y, r, rng.uniform(0, 2 * math.pi), grey))
                break
        else:
            raise RuntimeError("could not place a shape; the scene is too crowded")
    return shapes


# -- rendering ----------------------------------------------------------------------------------------------


def _render(shapes: list[Shape], scene: _Scene) -> Image.Image:
    return _draw(_backdrop(scene), shapes)


def _draw(backdrop: Image.Image, shapes: list[Shape]) -> Image.Image:
    """The shapes on a copy of the backdrop, downsampled: edges anti-aliased like a photo's, not aliased like a mask."""
    image = backdrop.copy()
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        _draw_shape(draw, shape, _SCALE)
    return image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def _backdrop(scene: _Scene) -> Image.Image:
    """The background and clutter at `_SCALE` times the size."""
    rng, scale = scene.rng, _SCALE
    image = Image.fromarray(_background(rng, SIZE * scale))
    draw = ImageDraw.Draw(image)
    for _ in range(scene.count(4, 12)):  # clutter: grey/brown dots and short strokes, never a palette colour
        tone = rng.randint(60, 170)
        colour = (tone, tone - rng.randint(0, 25), tone - rng.randint(0, 40))
        x, y = rng.uniform(0, SIZE) * scale, rng.uniform(0, SIZE) * scale
        if rng.random() < 0.5:
            r = rng.uniform(1.5, 3.5) * scale
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        else:
            angle, length = rng.uniform(0, math.pi), rng.uniform(6, 16) * scale
            end = (x + length * math.cos(angle), y + length * math.sin(angle))
            draw.line((x, y, *end), fill=colour, width=int(1.5 * scale))
    return image


def _background(rng: random.Random, size: int) -> np.ndarray:
    """A pale base colour with a gentle gradient and one of three low-contrast textures."""
    generator = np.random.default_rng(rng.getrandbits(63))
    base = np.array([rng.randint(195, 240) for _ in range(3)], dtype=np.float32)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) / size
    gradient = (rng.uniform(-18, 18) * rows + rng.uniform(-18, 18) * cols)[..., None]
    texture_kind = rng.randrange(3)
    if texture_kind == 0:  # fine noise
        texture = generator.normal(0, 6, (size, size, 1))
    elif texture_kind == 1:  # stripes
        period, angle = rng.uniform(10, 30), rng.uniform(0, math.pi)
        phase = (np.cos(angle) * cols + np.sin(angle) * rows) * size / period
        texture = 7 * np.sign(np.sin(2 * math.pi * phase))[..., None]
    else:  # blotches: upsampled coarse noise
        coarse = generator.normal(0, 9, (8, 8))
        texture = np.kron(coarse, np.ones((size // 8, size // 8)))[..., None]
    pixels = base + gradient + texture
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, scale: int) -> None:
    x, y, r = shape.x * scale, shape.y * scale, shape.radius * scale
    fill = shape.grey if shape.colour is None else COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        return
    if shape.kind == "square":
        points = _polygon(x, y, r, 4, shape.angle * 0.1 + math.pi / 4)  # near axis-aligned
    elif shape.kind == "triangle":
        points = _polygon(x, y, r * 1.15, 3, -math.pi / 2 + (shape.angle % 1.0 - 0.5) * 0.4)
    elif shape.kind == "star":
        outer = _polygon(x, y, r * 1.15, 5, -math.pi / 2 + shape.angle % 0.6)
        inner = _polygon(x, y, r * 0.5, 5, -math.pi / 2 + shape.angle % 0.6 + math.pi / 5)
        points = [point for pair in zip(outer, inner) for point in pair]
    elif shape.kind == "cross":
        arm = r * 0.36
        points = [(-arm, -r), (arm, -r), (arm, -arm), (r, -arm), (r, arm), (arm, arm), (arm, r), (-arm, r),
                  (-arm, arm), (-r, arm), (-r, -arm), (-arm, -arm)]
        points = [(x + px, y + py) for px, py in points]
    else:
        raise ValueError(f"unknown shape {shape.kind!r}")
    draw.polygon(points, fill=fill)


def _polygon(x: float, y: float, r: float, sides: int, start: float) -> list[tuple[float, float]]:
    return [(x + r * math.cos(start + 2 * math.pi * i / sides), y + r * math.sin(start + 2 * math.pi * i / sides))
            for i in range(sides)]
