"""Video reading: decord (default) or PyAV behind one interface, with resize at decode and a time limit.

`open_video(path, backend="auto", height=None, width=None, num_threads=1)` returns a reader with
`num_frames`, `fps`, `height`, `width` (of the frames it returns) and `get_frames(indices) -> uint8
(n, H, W, 3)`. Every failure is raised as `VideoReadError(path, kind, detail)`, where kind is one of
FAILURE_KINDS, so the dataset can count failures by kind.

Backend choice: "auto" uses decord when it imports, else PyAV (the GPU machine has no decord). The
environment variable DUALVAR_VIDEO_BACKEND overrides "auto"; an explicit backend that cannot be
imported raises.
"""
from __future__ import annotations

import functools
import os
import threading
from typing import Callable, Optional, Sequence, TypeVar

import numpy as np

# Kinds of failure a read can have; the dataset's counters use these names.
FAILURE_KINDS = ("missing", "empty", "unreadable", "too_short", "timeout")

T_ = TypeVar("T_")


class VideoReadError(RuntimeError):
    """A video could not be read. `kind` is one of FAILURE_KINDS; the message names the file."""

    def __init__(self, path: str, kind: str, detail: str):
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}")
        super().__init__(f"{kind}: {path}: {detail}")
        self.path, self.kind, self.detail = path, kind, detail


@functools.lru_cache(maxsize=None)
def _have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def available_backends() -> list[str]:
    return [b for b, m in (("decord", "decord"), ("pyav", "av")) if _have(m)]


def resolve_backend(backend: str = "auto") -> str:
    """Name of the reader backend that `backend` means here ("decord" or "pyav")."""
    if backend == "auto":
        backend = os.environ.get("DUALVAR_VIDEO_BACKEND", "auto")
    if backend == "auto":
        have = available_backends()
        if not have:
            raise RuntimeError("no video reader: install decord or av (PyAV)")
        return have[0]
    if backend not in ("decord", "pyav"):
        raise ValueError(f"video backend must be 'auto', 'decord' or 'pyav', got {backend!r}")
    if backend not in available_backends():
        raise RuntimeError(f"video backend {backend!r} requested but its module "
                           f"({'decord' if backend == 'decord' else 'av'}) does not import")
    return backend


def _precheck(path: str) -> None:
    if not os.path.exists(path):
        raise VideoReadError(path, "missing", "no such file")
    if os.path.getsize(path) == 0:
        raise VideoReadError(path, "empty", "zero-byte file")


def _check_indices(path: str, indices: Sequence[int], n: int) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if n <= 0:
        raise VideoReadError(path, "too_short", "video has no frames")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"{path}: frame indices must be in [0, {n - 1}], got [{idx.min()}, {idx.max()}]")
    return idx


def _resize_uint8(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (n, h, w, 3) -> (n, height, width, 3), bicubic with antialiasing."""
    import torch
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


class DecordReader:
    """decord.VideoReader with resize at decode; `get_frames` fetches only the requested frames."""

    backend = "decord"

    def __init__(self, path: str, height: Optional[int] = None, width: Optional[int] = None,
                 num_threads: int = 1):
        import decord
        _precheck(path)
        self.path = path
        kw = {}
        if height is not None and width is not None:
            kw = dict(width=int(width), height=int(height))
        elif (height is None) != (width is None):
            raise ValueError("give both height and width, or neither")
        self._resize_after: Optional[tuple[int, int]] = None
        self._num_threads = int(num_threads)
        try:
            self._vr = decord.VideoReader(path, num_threads=self._num_threads, **kw)
            if kw:
                h, w = int(height), int(width)
            elif len(self._vr) > 0:
                h, w = self._vr[0].shape[:2]
                self._vr.seek(0)
            else:
                h = w = 0
            self.num_frames = len(self._vr)
            self.fps = float(self._vr.get_avg_fps())
        except VideoReadError:
            raise
        except Exception as e:  # decord raises RuntimeError/DECORDError for anything it cannot open
            raise VideoReadError(path, "unreadable", f"decord: {str(e).splitlines()[0][:200]}") from e
        self.height, self.width = int(h), int(w)

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 (n, H, W, 3) frames at `indices` (any order, repeats allowed)."""
        idx = _check_indices(self.path, indices, self.num_frames)
        uniq, inverse = np.unique(idx, return_inverse=True)
        try:
            try:
                frames = self._vr.get_batch(uniq.tolist()).asnumpy()
            except Exception as e:
                # decord's resize at decode fails for some output widths ("The size must exactly
                # match", e.g. 24 or 48 px): decode at native size and resize with torch instead.
                if self._resize_after is not None or "must exactly match" not in str(e):
                    raise
                import decord
                self._vr = decord.VideoReader(self.path, num_threads=self._num_threads)
                self._resize_after = (self.height, self.width)
                frames = self._vr.get_batch(uniq.tolist()).asnumpy()
            if frames.shape[1:3] != (self.height, self.width):
                frames = _resize_uint8(frames, self.height, self.width)
        except Exception as e:
            raise VideoReadError(self.path, "unreadable", f"decord get_batch: {str(e).splitlines()[0][:200]}") from e
        if frames.shape[0] != uniq.size:
            raise VideoReadError(self.path, "unreadable", f"decoded {frames.shape[0]} of {uniq.size} frames")
        return frames[inverse]


class PyAVReader:
    """PyAV reader with the same interface: seeks to the keyframe before the first needed frame,
    decodes up to the last one and converts/resizes with swscale (bicubic). Frame count comes from
    the container, else from counting packets."""

    backend = "pyav"
    seek = True  # seek to the keyframe before the first needed frame (False: decode from the start)

    def __init__(self, path: str, height: Optional[int] = None, width: Optional[int] = None,
                 num_threads: int = 1):
        import av
        _precheck(path)
        if (height is None) != (width is None):
            raise ValueError("give both height and width, or neither")
        self.path, self._out_hw, self._threads = path, (height, width), int(num_threads)
        try:
            with av.open(path) as c:
                if not c.streams.video:
                    raise VideoReadError(path, "unreadable", "no video stream")
                s = c.streams.video[0]
                n = int(s.frames or 0)
                if n <= 0:
                    n = sum(1 for p in c.demux(s) if p.size > 0)
                rate = s.average_rate or s.guessed_rate
                self.fps = float(rate) if rate else 0.0
                self.num_frames = n
                self.height = int(height if height is not None else s.codec_context.height)
                self.width = int(width if width is not None else s.codec_context.width)
        except VideoReadError:
            raise
        except Exception as e:
            raise VideoReadError(path, "unreadable", f"pyav: {type(e).__name__}: {str(e)[:200]}") from e

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 (n, H, W, 3) frames at `indices` (any order, repeats allowed)."""
        import av
        idx = _check_indices(self.path, indices, self.num_frames)
        uniq, inverse = np.unique(idx, return_inverse=True)
        want = {int(i): k for k, i in enumerate(uniq)}
        last = int(uniq[-1]) if uniq.size else -1
        out = np.empty((uniq.size, self.height, self.width, 3), np.uint8)
        try:
            got = self._decode(av, want, last, self.seek, out) if uniq.size else 0
            if got < 0:  # the seek landed after the first wanted frame or frames had no pts
                got = self._decode(av, want, last, False, out)
        except Exception as e:
            raise VideoReadError(self.path, "unreadable", f"pyav decode: {type(e).__name__}: {str(e)[:200]}") from e
        if got != uniq.size:
            raise VideoReadError(self.path, "unreadable", f"decoded {got} of {uniq.size} requested frames "
                                 f"(header says {self.num_frames}; truncated?)")
        return out[inverse]

    def _decode(self, av, want: dict, last: int, seek: bool, out: np.ndarray) -> int:
        """Decode into `out` the frames in `want` ({frame index: row}); returns how many, or -1
        when a seek cannot be trusted. With seek, jump to the keyframe before the first wanted frame
        and number frames by presentation time: index = round((pts - start) * time_base * fps)."""
        first = min(want)
        got = 0
        with av.open(self.path) as c:
            s = c.streams.video[0]
            s.thread_count = self._threads
            start = s.start_time or 0
            tb = s.time_base
            seek = bool(seek and first > 0 and self.fps > 0 and tb)
            if seek:
                c.seek(start + int(first / self.fps / float(tb)), stream=s, backward=True, any_frame=False)
            for n, frame in enumerate(c.decode(s)):
                if seek:
                    if frame.pts is None:
                        return -1
                    i = int(round(float((frame.pts - start) * tb) * self.fps))
                    if n == 0 and i > first:
                        return -1
                else:
                    i = n
                if i in want:
                    out[want[i]] = frame.to_ndarray(format="rgb24", width=self.width, height=self.height,
                                                    interpolation="BICUBIC")
                    got += 1
                if i >= last:
                    break
        return got


def open_video(path: str, backend: str = "auto", height: Optional[int] = None, width: Optional[int] = None,
               num_threads: int = 1):
    """Open `path` for reading frames resized to (height, width) at decode (None: native size)."""
    name = resolve_backend(backend)
    cls = DecordReader if name == "decord" else PyAVReader
    return cls(str(path), height=height, width=width, num_threads=num_threads)


def call_with_timeout(fn: Callable[[], T_], timeout_s: Optional[float], path: str) -> T_:
    """Run fn() in a daemon thread and wait at most timeout_s seconds.

    Why a thread: decord (ctypes) and PyAV (Cython, nogil) release the GIL while decoding, so the
    calling thread keeps control and can give up on a stuck decode; `signal.alarm` would only work in
    the main thread and cannot interrupt a native call. A decode that never returns is abandoned (the
    daemon thread keeps its resources until the process exits), and the read fails with kind "timeout".
    """
    if timeout_s is None or timeout_s <= 0:
        return fn()
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=run, daemon=True, name="dualvar-decode")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise VideoReadError(path, "timeout", f"read took longer than {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def read_frames(path: str, indices: Sequence[int], *, height: Optional[int] = None, width: Optional[int] = None,
                backend: str = "auto", num_threads: int = 1, timeout_s: Optional[float] = None,
                min_frames: int = 1):
    """Open, check length, and read frames under one time limit.

    `indices` may be a callable L -> index array, so indices can depend on the true frame count.
    Returns (frames uint8 (n, H, W, 3), num_frames, resolved indices).
    """
    def work():
        r = open_video(path, backend=backend, height=height, width=width, num_threads=num_threads)
        if r.num_frames < max(1, min_frames):
            raise VideoReadError(path, "too_short", f"{r.num_frames} frames, need at least {max(1, min_frames)}")
        idx = np.asarray(indices(r.num_frames) if callable(indices) else indices, dtype=np.int64)
        return r.get_frames(idx.reshape(-1)).reshape(idx.shape + (r.height, r.width, 3)), r.num_frames, idx
    return call_with_timeout(work, timeout_s, str(path))
