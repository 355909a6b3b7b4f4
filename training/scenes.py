"""Procedural scenes with templated questions whose answers are known, for training and scoring a tiny VLM.

A scene is a 224x224 image: a low-contrast textured background, small grey clutter (dots, short strokes) and
2-6 flat coloured shapes. Every question is built together with its scene so that its answer is uniformly
distributed over its answer set and the question text says nothing about it (text-only accuracy is chance):

- colour: "What colour is the star?"           -> red / green / blue / yellow / purple (that shape is unique)
- shape:  "What shape is the blue one?"        -> circle / square / triangle / star / cross (that colour is unique)
- count:  "How many squares are there?"        -> 1 / 2 / 3 / 4 (other shapes are present too)
- where:  "Where is the triangle?"             -> left / right / top / bottom (it sits in that zone; others avoid it)

Everything is a function of (split, index): `sample("test", 7)` is the same scene on every machine.
"""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
from PIL import Image, ImageDraw

SIZE = 224
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
COLOURS = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 25),
    "purple": (145, 50, 185),
}
ZONES = ("left", "right", "top", "bottom")
COUNTS = (1, 2, 3, 4)
KINDS = ("colour", "shape", "count", "where")
TEMPLATES = {
    "colour": ("What colour is the {shape}?", "Which colour does the {shape} have?"),
    "shape": ("What shape is the {colour} one?", "Which shape is {colour}?"),
    "count": ("How many {plural} are there?", "How many {plural}?"),
    "where": ("Where is the {shape}?", "Where is the {shape} located?"),
}
ANSWERS = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": tuple(str(count) for count in COUNTS),
    "where": ZONES,
}
_RADIUS = (13, 19)  # shape half-size in pixels: 2-3 patches of 16 px across
_MARGIN = 4


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    x: float
    y: float
    radius: float
    angle: float


@dataclasses.dataclass
class Sample:
    image: Image.Image
    question: str
    answer: str
    kind: str
    shapes: list[Shape]


def sample(split: str, index: int) -> Sample:
    """The scene, question and answer number `index` of `split` ("train", "test", ...); deterministic."""
    rng = random.Random(f"illava-scenes/{split}/{index}")
    kind = KINDS[index % len(KINDS)]
    shapes, question, answer = _LAYOUTS[kind](rng)
    return Sample(_render(shapes, rng), question, answer, kind, shapes)


def samples(split: str, count: int, start: int = 0) -> list[Sample]:
    return [sample(split, index) for index in range(start, start + count)]


# -- layouts: which shapes go where, chosen together with the question -------------------------------------


def _colour_question(rng: random.Random) -> tuple[list[Shape], str, str]:
    target = rng.choice(SHAPES)
    colour = rng.choice(tuple(COLOURS))
    others = [(rng.choice([s for s in SHAPES if s != target]), rng.choice(tuple(COLOURS))) for _ in range(rng.randint(1, 4))]
    shapes = _place(rng, [(target, colour)] + others)
    return shapes, rng.choice(TEMPLATES["colour"]).format(shape=target), colour


def _shape_question(rng: random.Random) -> tuple[list[Shape], str, str]:
    target = rng.choice(SHAPES)
    colour = rng.choice(tuple(COLOURS))
    others = [(rng.choice(SHAPES), rng.choice([c for c in COLOURS if c != colour])) for _ in range(rng.randint(1, 4))]
    shapes = _place(rng, [(target, colour)] + others)
    return shapes, rng.choice(TEMPLATES["shape"]).format(colour=colour), target


def _count_question(rng: random.Random) -> tuple[list[Shape], str, str]:
    target = rng.choice(SHAPES)
    count = rng.choice(COUNTS)
    items = [(target, rng.choice(tuple(COLOURS))) for _ in range(count)]
    items += [(rng.choice([s for s in SHAPES if s != target]), rng.choice(tuple(COLOURS))) for _ in range(rng.randint(1, 2))]
    rng.shuffle(items)
    shapes = _place(rng, items)
    return shapes, rng.choice(TEMPLATES["count"]).format(plural=PLURALS[target]), str(count)


def _where_question(rng: random.Random) -> tuple[list[Shape], str, str]:
    target = rng.choice(SHAPES)
    zone = rng.choice(ZONES)
    others = [(rng.choice([s for s in SHAPES if s != target]), rng.choice(tuple(COLOURS))) for _ in range(rng.randint(1, 3))]
    radius = rng.uniform(*_RADIUS)
    x, y = _zone_point(rng, zone, radius)
    anchor = Shape(target, rng.choice(tuple(COLOURS)), x, y, radius, rng.uniform(0, 2 * math.pi))
    shapes = _place(rng, others, placed=[anchor])
    return shapes, rng.choice(TEMPLATES["where"]).format(shape=target), zone


_LAYOUTS = {"colour": _colour_question, "shape": _shape_question, "count": _count_question, "where": _where_question}


def _zone_point(rng: random.Random, zone: str, radius: float) -> tuple[float, float]:
    """A centre clearly inside one of four zones: the outer third along one axis, the middle along the other."""
    outer = rng.uniform(radius + _MARGIN, SIZE / 3 - radius / 2)
    middle = rng.uniform(SIZE * 0.3, SIZE * 0.7)
    return {
        "left": (outer, middle),
        "right": (SIZE - outer, middle),
        "top": (middle, outer),
        "bottom": (middle, SIZE - outer),
    }[zone]


def _place(rng: random.Random, items: list[tuple[str, str]], placed: list[Shape] | None = None) -> list[Shape]:
    """Non-overlapping positions for `items` (rejection sampling; shrinks shapes if the scene gets crowded)."""
    shapes = list(placed or [])
    for kind, colour in items:
        radius = rng.uniform(*_RADIUS)
        for attempt in range(400):
            scale = 1.0 - 0.3 * attempt / 400
            r = radius * scale
            x = rng.uniform(r + _MARGIN, SIZE - r - _MARGIN)
            y = rng.uniform(r + _MARGIN, SIZE - r - _MARGIN)
            if all(math.hypot(x - s.x, y - s.y) > (r + s.radius) * 1.15 + 2 for s in shapes):
                shapes.append(Shape(kind, colour, x, y, r, rng.uniform(0, 2 * math.pi)))
                break
        else:
            raise RuntimeError("could not place a shape; the scene is too crowded")
    return shapes


# -- rendering ----------------------------------------------------------------------------------------------


def _render(shapes: list[Shape], rng: random.Random) -> Image.Image:
    """Draw at 2x and downsample, so edges are anti-aliased like a photo's rather than aliased like a mask."""
    scale = 2
    image = Image.fromarray(_background(rng, SIZE * scale))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(4, 12)):  # clutter: grey/brown dots and short strokes, never a palette colour
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
    for shape in shapes:
        _draw_shape(draw, shape, scale)
    return image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


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
    x, y, r, fill = shape.x * scale, shape.y * scale, shape.radius * scale, COLOURS[shape.colour]
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
