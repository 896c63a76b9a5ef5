"""Synthetic videos in UCF101's layout, whose classes can only be told apart using time.

Each class is an ordered pair of motions (a, b), a != b, from {right, left, down, up, grow, shrink}:
a shape does motion a for the first half of the video and motion b for the second. "right then up"
and "up then right" share every frame content statistic and differ only in temporal order, and time
reversal maps a class to a different class. Appearance varies within a class: background gradient
colours, shape (square, disc, diamond), shape colour, size, start position, speed, and pixel noise.

Layout written (identical to UCF101, so `index_ucf101` reads it unchanged):
    OUT/<Class>/v_<Class>_gXX_cYY.avi        mpeg4 in AVI, written with PyAV
    OUT/ucfTrainTestlist/classInd.txt         "1 RightThenUp"
    OUT/ucfTrainTestlist/trainlist01.txt      "RightThenUp/v_RightThenUp_g01_c01.avi 1"
    OUT/ucfTrainTestlist/testlist01.txt       "RightThenUp/v_RightThenUp_g09_c01.avi"
The last ~30% of each class's videos (whole groups) form the test list.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from typing import Optional

import numpy as np

MOTIONS = ("Right", "Left", "Down", "Up", "Grow", "Shrink")
CLIPS_PER_GROUP = 4


def class_names(classes: int) -> list[str]:
    n = len(MOTIONS)
    # Unordered pairs, neighbours first, each followed by its order swap: small class counts still
    # use every motion and contain pairs that differ only in temporal order.
    unordered = [(i, (i + d) % n) for d in range(1, n // 2 + 1) for i in range(n)]
    seen, ordered = set(), []
    for i, j in unordered:
        key = frozenset((i, j))
        if key not in seen:
            seen.add(key)
            ordered += [(MOTIONS[i], MOTIONS[j]), (MOTIONS[j], MOTIONS[i])]
    if not 1 <= classes <= len(ordered):
        raise ValueError(f"classes must be in [1, {len(ordered)}], got {classes}")
    return [f"{a}Then{b}" for a, b in ordered[:classes]]


def _motion_delta(name: str) -> tuple[float, float, float]:
    """(dy, dx, dscale) direction of one motion."""
    return {"Right": (0, 1, 0), "Left": (0, -1, 0), "Down": (1, 0, 0), "Up": (-1, 0, 0),
            "Grow": (0, 0, 1), "Shrink": (0, 0, -1)}[name]


def render_video(class_name: str, frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """uint8 (frames, height, width, 3) video of `class_name` with appearance drawn from `seed`."""
    return _render(class_name, frames, height, width, seed)[0]


def shape_path(class_name: str, frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """float (frames, 3): centre y, centre x and size of the shape in `render_video`'s video."""
    return _render(class_name, frames, height, width, seed, draw=False)[1]


def _render(class_name: str, frames: int, height: int, width: int, seed: int, draw: bool = True):
    rng = np.random.default_rng(seed)
    first, second = class_name.split("Then")
    side = min(height, width)
    # appearance
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    colour = rng.uniform(0, 255, 3)
    while np.abs(colour - (c0 + c1) / 2).max() < 80:
        colour = rng.uniform(0, 255, 3)
    shape = int(rng.integers(0, 3))
    radius0 = side * rng.uniform(0.09, 0.14)
    noise = rng.uniform(2, 10)
    angle = rng.uniform(0, 2 * np.pi)
    # motion: each half moves `travel` pixels (or scales radius by `grow`)
    travel = side * rng.uniform(0.25, 0.35)
    grow = rng.uniform(0.6, 0.9)
    half = frames // 2
    t = np.arange(frames)
    prog_a = np.minimum(t, half) / max(half, 1)
    prog_b = np.maximum(t - half, 0) / max(frames - half, 1)
    dy = np.zeros(frames)
    dx = np.zeros(frames)
    log_r = np.zeros(frames)
    for motion, prog in ((first, prog_a), (second, prog_b)):
        my, mx, ms = _motion_delta(motion)
        dy += my * travel * prog
        dx += mx * travel * prog
        log_r += ms * np.log(1 / grow) * prog
    radius = radius0 * np.exp(log_r)
    rmax = radius.max()
    # start so that the whole path stays in the frame
    lo_y, hi_y = rmax - dy.min(), height - rmax - dy.max()
    lo_x, hi_x = rmax - dx.min(), width - rmax - dx.max()
    y0 = rng.uniform(lo_y, max(lo_y, hi_y))
    x0 = rng.uniform(lo_x, max(lo_x, hi_x))
    path = np.stack([y0 + dy, x0 + dx, radius], axis=1)
    if not draw:
        return None, path
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (np.cos(angle) * yy / height + np.sin(angle) * xx / width)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    background = (c0[None, None] * (1 - ramp[..., None]) + c1[None, None] * ramp[..., None]).astype(np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    for f in range(frames):
        cy, cx, r = y0 + dy[f], x0 + dx[f], radius[f]
        if shape == 0:
            mask = np.maximum(np.abs(yy - cy), np.abs(xx - cx)) <= r
        elif shape == 1:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            mask = np.abs(yy - cy) + np.abs(xx - cx) <= 1.3 * r
        img = background.copy()
        img[mask] = colour
        img += rng.normal(0, noise, img.shape).astype(np.float32)
        out[f] = np.clip(img, 0, 255).astype(np.uint8)
    return out, path


def write_video(path: str, video: np.ndarray, fps: int = 25) -> None:
    """Encode uint8 (T, H, W, 3) as mpeg4 (high quality) with PyAV."""
    import av
    T, H, W, _ = video.shape
    with av.open(path, "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.codec_context.options = {"qscale": "3"}
        s.codec_context.qmin, s.codec_context.qmax = 2, 4
        for frame in video:
            for packet in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


def _write_one(job: tuple) -> str:
    path, class_name, frames, height, width, seed = job
    write_video(path, render_video(class_name, frames, height, width, seed))
    return path


def write_synthetic_dataset(out: str, classes: int = 10, videos_per_class: int = 30, frames: int = 64,
                            height: int = 128, width: int = 171, seed: int = 0,
                            workers: Optional[int] = None) -> dict:
    """Write the synthetic set to `out` in UCF101's layout; deterministic for `seed`.

    Returns {"root", "classes", "train", "test"} (class names and relative paths per split).
    """
    if videos_per_class < 1 or frames < 2 or height < 8 or width < 8:
        raise ValueError("need videos_per_class >= 1, frames >= 2 and a frame of at least 8x8")
    names = class_names(classes)
    n_test = 0 if videos_per_class < 2 else max(1, round(0.3 * videos_per_class))
    n_train = videos_per_class - n_test
    jobs, train, test = [], [], []
    ss = np.random.SeedSequence(seed)
    seeds = ss.generate_state(classes * videos_per_class, dtype=np.uint32)
    for ci, name in enumerate(names):
        os.makedirs(os.path.join(out, name), exist_ok=True)
        for v in range(videos_per_class):
            # train and test never share a group, as in UCF101
            if v < n_train:
                g, c = v // CLIPS_PER_GROUP + 1, v % CLIPS_PER_GROUP + 1
            else:
                w = v - n_train
                g = (n_train + CLIPS_PER_GROUP - 1) // CLIPS_PER_GROUP + w // CLIPS_PER_GROUP + 1
                c = w % CLIPS_PER_GROUP + 1
            rel = f"{name}/v_{name}_g{g:02d}_c{c:02d}.avi"
            (train if v < n_train else test).append((rel, ci + 1))
            jobs.append((os.path.join(out, rel), name, frames, height, width, int(seeds[ci * videos_per_class + v])))
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_one, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        for job in jobs:
            _write_one(job)
    lists = os.path.join(out, "ucfTrainTestlist")
    os.makedirs(lists, exist_ok=True)
    with open(os.path.join(lists, "classInd.txt"), "w") as f:
        f.writelines(f"{i + 1} {n}\n" for i, n in enumerate(names))
    with open(os.path.join(lists, "trainlist01.txt"), "w") as f:
        f.writelines(f"{rel} {lab}\n" for rel, lab in train)
    with open(os.path.join(lists, "testlist01.txt"), "w") as f:
        f.writelines(f"{rel}\n" for rel, _ in test)
    return {"root": out, "classes": names, "train": [r for r, _ in train], "test": [r for r, _ in test]}
