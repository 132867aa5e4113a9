"""The shapes world: a deterministic synthetic world of coloured shapes, questions and captions.

Every scene is drawn from an explicit ``numpy.random.Generator``. Each shape is filled with its own fine pattern
(solid circles, horizontally striped squares, vertically striped triangles, checkered crosses; the dark lines are
the object's colour at ``DARK`` brightness), so that a single 4 x 4 patch inside an object tells its shape. Without
it, a vision transformer of this size trained on two CPU cores for minutes does not learn silhouettes: with plain
fills its per-patch shape accuracy stayed near chance (0.29 for 4 shapes) after 400 steps of 32 images, against
0.94 with the patterns. A scene holds one to four objects; within a
scene each object has its own shape and its own colour, so "the circle" and "the red object" name one object.
Objects come in three sizes; the small one covers about two by two patches of the tiny VLM's encoder, so a
token-dropping method that discards the wrong patches visibly loses it.

Question types (the answer is always one word):

=========  ==============================================  ===========================
type       template (the word naming the object comes last)                                        answers
=========  ==============================================  ===========================
color      what color is the {shape}                       a colour
shape      what shape is {color}                           a shape
count      how many objects are there                      one .. four
position   is the {shape} left or right of the {shape}     left / right
           is the {shape} above or below the {shape}       above / below
smallest   what color is the smallest object               a colour
size       what size is the {shape}                        small / medium / large
=========  ==============================================  ===========================

Position questions are asked only when the two centres are at least ``MIN_GAP`` pixels apart on that axis, and
"smallest" questions only when one object is strictly smaller than all others, so every question has one right
answer. The caption lists the objects from left to right as ``"{size} {color} {shape}"`` joined by ``and``.

Shapes (images ``uint8[H, W, 3]``):
    H = W = ``IMAGE_SIZE`` (48) pixels, RGB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllm_ref import _checks

IMAGE_SIZE = 48
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (165, 70, 210),
    "white": (235, 235, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
#: Half-width of each size class in pixels.
SIZES: dict[str, float] = {"small": 3.5, "medium": 5.5, "large": 8.0}
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four")
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "position", "smallest", "size")
MIN_GAP = 6.0
BACKGROUND = 24
#: Seed of the held-out evaluation scenes (training never draws from it).
EVAL_SEED = 1_000_003
#: Seed of the held-out caption scenes.
CAPTION_SEED = 2_000_003


@dataclass(frozen=True)
class Obj:
    """One object: its shape, colour and size names, and its centre in pixels (x to the right, y down)."""

    shape: str
    color: str
    size: str
    x: float
    y: float

    @property
    def radius(self) -> float:
        return SIZES[self.size]


@dataclass(frozen=True)
class Scene:
    """A scene: a tuple of objects with distinct shapes and distinct colours."""

    objects: tuple[Obj, ...]


@dataclass(frozen=True)
class QA:
    """A question of a given type with its one-word answer."""

    qtype: str
    question: str
    answer: str


def make_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """Draw a scene of ``n_objects`` (1 to 4; drawn uniformly when ``None``) non-overlapping objects."""
    _checks.generator(rng)
    if n_objects is None:
        n_objects = int(rng.integers(1, 5))
    n_objects = _checks.integer(n_objects, "n_objects", low=1, high=len(SHAPES))
    while True:  # rejection sampling; a free layout is found within a few tries
        shapes = rng.permutation(len(SHAPES))[:n_objects]
        colors = rng.permutation(len(COLORS))[:n_objects]
        sizes = rng.integers(0, len(SIZES), size=n_objects)
        size_names = [list(SIZES)[s] for s in sizes]
        objs = []
        for i in range(n_objects):
            r = SIZES[size_names[i]]
            placed = False
            for _ in range(50):
                x, y = rng.uniform(r + 1, IMAGE_SIZE - r - 1, size=2)
                if all(np.hypot(x - o.x, y - o.y) > r + o.radius + 2 for o in objs):
                    placed = True
                    break
            if not placed:
                break
            objs.append(
                Obj(SHAPES[shapes[i]], list(COLORS)[colors[i]], size_names[i], round(float(x), 2), round(float(y), 2))
            )
        if len(objs) == n_objects:
            return Scene(tuple(objs))


#: Each shape's fill pattern (period 2 pixels, so any 4 x 4 patch inside the shape shows it).
_PATTERNS = {
    "circle": lambda r, c: np.ones_like(r, dtype=bool),
    "square": lambda r, c: r % 2 == 0,
    "triangle": lambda r, c: c % 2 == 0,
    "cross": lambda r, c: (r + c) % 2 == 0,
}
#: Brightness of a pattern's dark lines, relative to the object's colour.
DARK = 0.55


def _shape_mask(obj: Obj, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    dx, dy, r = xx - obj.x, yy - obj.y, obj.radius
    if obj.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if obj.shape == "square":
        s = r * 0.85
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if obj.shape == "triangle":  # apex up, base at the bottom
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if obj.shape == "cross":
        w = max(r * 0.3, 1.0)
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene) -> np.ndarray:
    """Draw ``scene`` as ``uint8[IMAGE_SIZE, IMAGE_SIZE, 3]`` (pixel centres at half-integers)."""
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be a Scene, got {type(scene).__name__}")
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), BACKGROUND, dtype=np.uint8)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    row, col = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    for obj in scene.objects:
        mask = _shape_mask(obj, yy, xx)
        color = np.array(COLORS[obj.color], dtype=np.float64)
        shade = _PATTERNS[obj.shape](row, col)  # 1: full colour, 0: a darker line of the same colour
        pixels = np.where(shade[..., None], color, color * DARK).astype(np.uint8)
        img[mask] = pixels[mask]
    return img


def object_map(scene: Scene) -> np.ndarray:
    """``int8[IMAGE_SIZE, IMAGE_SIZE]``: 1 + the index of the object drawn at each pixel, 0 for background."""
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be a Scene, got {type(scene).__name__}")
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.int8)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    for i, obj in enumerate(scene.objects):
        out[_shape_mask(obj, yy, xx)] = i + 1
    return out


def patch_objects(scene: Scene, patch: int, min_pixels: int = 3) -> np.ndarray:
    """``int8[G, G]`` with G = IMAGE_SIZE / patch: per patch, 1 + the index of the object covering most of its
    pixels (at least ``min_pixels``), else 0. Ties go to the object drawn first."""
    patch = _checks.integer(patch, "patch", low=1, high=IMAGE_SIZE)
    if IMAGE_SIZE % patch:
        raise ValueError(f"patch must divide {IMAGE_SIZE}, got {patch}")
    g = IMAGE_SIZE // patch
    omap = object_map(scene).reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g, g, patch * patch)
    counts = np.stack([(omap == i + 1).sum(-1) for i in range(len(scene.objects))], axis=-1)
    best = counts.argmax(-1)
    return np.where(counts.max(-1) >= min_pixels, best + 1, 0).astype(np.int8)


def caption(scene: Scene) -> str:
    """The caption: objects left to right as ``"{size} {color} {shape}"`` joined by ``"and"``."""
    objs = sorted(scene.objects, key=lambda o: o.x)
    return " and ".join(f"{o.size} {o.color} {o.shape}" for o in objs)


def _smallest(scene: Scene) -> Obj | None:
    order = sorted(scene.objects, key=lambda o: o.radius)
    if len(order) < 2 or order[0].radius == order[1].radius:
        return None
    return order[0]


def all_questions(scene: Scene) -> list[QA]:
    """Every question the scene answers unambiguously, in a fixed order."""
    out: list[QA] = []
    for o in scene.objects:
        out.append(QA("color", f"what color is the {o.shape}", o.color))
        out.append(QA("shape", f"what shape is {o.color}", o.shape))
        out.append(QA("size", f"what size is the {o.shape}", o.size))
    out.append(QA("count", "how many objects are there", NUMBERS[len(scene.objects) - 1]))
    for a in scene.objects:
        for b in scene.objects:
            if a is b:
                continue
            if abs(a.x - b.x) >= MIN_GAP:
                out.append(
                    QA("position", f"is the {a.shape} left or right of the {b.shape}", "left" if a.x < b.x else "right")
                )
            if abs(a.y - b.y) >= MIN_GAP:
                out.append(
                    QA("position", f"is the {a.shape} above or below the {b.shape}", "above" if a.y < b.y else "below")
                )
    small = _smallest(scene)
    if small is not None:
        out.append(QA("smallest", "what color is the smallest object", small.color))
    return out


def sample_question(scene: Scene, qtype: str, rng: np.random.Generator) -> QA | None:
    """One question of type ``qtype`` about ``scene`` drawn with ``rng``, or ``None`` if it has none."""
    _checks.choice(qtype, "qtype", QUESTION_TYPES)
    pool = [qa for qa in all_questions(scene) if qa.qtype == qtype]
    if not pool:
        return None
    return pool[int(rng.integers(len(pool)))]


@dataclass(frozen=True)
class Example:
    """A rendered scene with one question (for VQA) and its caption."""

    image: np.ndarray
    scene: Scene
    qa: QA
    caption: str


def vqa_set(seed: int, n_per_type: int) -> list[Example]:
    """A held-out VQA set: ``n_per_type`` examples for each question type, drawn from ``seed``.

    Scenes for "position" and "smallest" questions are redrawn until they have such a question (they need two
    or more objects), so every type gets the same number of examples.
    """
    seed = _checks.integer(seed, "seed", low=0)
    n_per_type = _checks.integer(n_per_type, "n_per_type", low=1)
    rng = np.random.default_rng(seed)
    out = []
    for qtype in QUESTION_TYPES:
        made = 0
        while made < n_per_type:
            scene = make_scene(rng)
            qa = sample_question(scene, qtype, rng)
            if qa is None:
                continue
            out.append(Example(render(scene), scene, qa, caption(scene)))
            made += 1
    return out
