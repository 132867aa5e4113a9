"""Short synthetic clips from the shapes world: the objects of one scene drift a few pixels per frame.

Used by :mod:`mllm_ref.tokens.frame_merge` (temporal token merging) and the book. A clip is drawn from an explicit
seed: one scene (:func:`mllm_ref.tinyvlm.world.make_scene`), a velocity per object (``speed`` pixels per frame at
most on each axis, some objects may stay still), and each frame rendered by :func:`mllm_ref.tinyvlm.world.render`
after moving the centres; an object bounces off the canvas border so it stays whole. Objects may overlap while they
move (the later one is drawn on top); the background never changes, which is what temporal merging exploits.

Shapes:
    frames: ``uint8[F, 48, 48, 3]``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from mllm_ref import _checks
from mllm_ref.tinyvlm import world


@dataclass(frozen=True)
class Clip:
    """A clip: its frames, the scene drawn in each frame, and each object's initial velocity ``(vx, vy)`` in pixels
    per frame (a bounce off the border flips it)."""

    frames: np.ndarray
    scenes: tuple[world.Scene, ...]
    velocities: np.ndarray


def _step(pos: float, vel: float, radius: float) -> tuple[float, float]:
    lo, hi = radius + 1.0, world.IMAGE_SIZE - radius - 1.0
    pos = pos + vel
    if pos < lo:
        pos, vel = 2 * lo - pos, -vel
    elif pos > hi:
        pos, vel = 2 * hi - pos, -vel
    return round(float(pos), 2), vel


def make_clip(seed: int = 0, n_frames: int = 8, speed: float = 2.0, n_objects: int | None = None) -> Clip:
    """A seeded clip of ``n_frames`` frames in which each object moves by a constant velocity.

    Args:
        seed: the clip's seed (the scene and the velocities are drawn from it).
        n_frames: frames in the clip (>= 1).
        speed: the largest displacement per frame along each axis, in pixels; each object draws
            ``vx, vy`` uniformly from ``{-speed, 0, +speed}`` (so some objects may stay still).
        n_objects: objects in the scene (1 to 4), drawn when ``None``.

    Returns:
        A :class:`Clip`; ``frames`` is ``uint8[n_frames, 48, 48, 3]``.
    """
    seed = _checks.integer(seed, "seed", low=0)
    n_frames = _checks.integer(n_frames, "n_frames", low=1)
    speed = _checks.real(speed, "speed", low=0.0, high=8.0)
    rng = np.random.default_rng(seed)
    scene = world.make_scene(rng, n_objects)
    vel = rng.integers(-1, 2, size=(len(scene.objects), 2)).astype(np.float64) * speed
    frames, scenes = [], []
    objs = list(scene.objects)
    v = vel.copy()
    for f in range(n_frames):
        if f > 0:
            moved = []
            for i, o in enumerate(objs):
                x, v[i, 0] = _step(o.x, v[i, 0], o.radius)
                y, v[i, 1] = _step(o.y, v[i, 1], o.radius)
                moved.append(replace(o, x=x, y=y))
            objs = moved
        s = world.Scene(tuple(objs))
        scenes.append(s)
        frames.append(world.render(s))
    return Clip(np.stack(frames), tuple(scenes), vel)
