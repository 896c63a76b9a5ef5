"""Readers: decord and PyAV agree, resize at decode, only requested frames, errors by kind with the path."""
import os
import time

import numpy as np
import pytest

from dualvar.engine.data import reader as R
from dualvar.engine.data.synthetic import render_video, write_video

BACKENDS = R.available_backends()


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("vid")
    frames = render_video("RightThenUp", 21, 48, 62, seed=3)  # odd sizes and length
    path = str(d / "v.avi")
    write_video(path, frames)
    return path, frames


def test_pyav_always_available():
    # PyAV also writes the synthetic set, so it is a hard dependency; decord is preferred when present
    # (the Makefile installs it; some machines, e.g. the GPU one, have no decord wheel).
    assert "pyav" in BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
def test_reader_reads_requested_frames(video_file, backend):
    path, frames = video_file
    r = R.open_video(path, backend=backend)
    assert (r.num_frames, r.height, r.width) == (21, 48, 62)
    assert abs(r.fps - 25) < 1e-6
    idx = [20, 0, 5, 5, 13]
    got = r.get_frames(idx)
    assert got.shape == (5, 48, 62, 3) and got.dtype == np.uint8
    # lossy codec: close to the source frames, and each frame closest to its own source frame
    err = np.abs(got.astype(np.float32) - frames[idx].astype(np.float32)).mean(axis=(1, 2, 3))
    assert err.max() < 12
    np.testing.assert_array_equal(got[2], got[3])
    other = np.abs(got[0].astype(np.float32) - frames[0].astype(np.float32)).mean()
    assert other > err[0]


def test_backends_agree(video_file):
    path, frames = video_file
    b = R.open_video(path, backend="pyav").get_frames([0, 7, 20])
    # without decord, compare against the source frames (looser: the codec is lossy)
    a = R.open_video(path, backend="decord").get_frames([0, 7, 20]) if "decord" in BACKENDS else frames[[0, 7, 20]]
    assert np.abs(a.astype(np.int16) - b.astype(np.int16)).mean() < (2.0 if "decord" in BACKENDS else 12.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_at_decode(video_file, backend):
    path, frames = video_file
    r = R.open_video(path, backend=backend, height=31, width=40)
    got = r.get_frames([4])
    assert got.shape == (1, 31, 40, 3)
    import torch
    ref = torch.nn.functional.interpolate(torch.from_numpy(frames[4:5]).permute(0, 3, 1, 2).float(), (31, 40),
                                          mode="bilinear", antialias=True)[0].permute(1, 2, 0).numpy()
    assert np.abs(got[0].astype(np.float32) - ref).mean() < 10


def test_auto_backend_and_override(monkeypatch):
    monkeypatch.delenv("DUALVAR_VIDEO_BACKEND", raising=False)
    assert R.resolve_backend("auto") == BACKENDS[0]  # decord first when installed
    monkeypatch.setenv("DUALVAR_VIDEO_BACKEND", "pyav")
    assert R.resolve_backend("auto") == "pyav"
    with pytest.raises(ValueError, match="video backend"):
        R.resolve_backend("opencv")


def make_bad_files(d, good_path):
    """Every kind of bad file; returns {name: (path, expected kind)}."""
    d = str(d)
    out = {"missing": (os.path.join(d, "missing.avi"), "missing")}
    p = os.path.join(d, "empty.avi")
    open(p, "wb").close()
    out["empty"] = (p, "empty")
    p = os.path.join(d, "text.avi")
    with open(p, "w") as f:
        f.write("this is not a video\n" * 50)
    out["non_video"] = (p, "unreadable")
    p = os.path.join(d, "truncated.avi")
    with open(good_path, "rb") as f:
        data = f.read()
    with open(p, "wb") as f:
        f.write(data[: len(data) // 3])
    out["truncated"] = (p, "unreadable")
    p = os.path.join(d, "unreadable.avi")
    with open(p, "wb") as f:
        f.write(data)
    os.chmod(p, 0)
    if os.access(p, os.R_OK):  # running as root: permissions do not stop reads; use a folder instead
        os.chmod(p, 0o644)
        os.remove(p)
        os.makedirs(os.path.join(p, "inside"))
    out["unreadable"] = (p, "unreadable")
    p = os.path.join(d, "audio_only.avi")
    import av
    with av.open(p, "w", format="wav") as c:
        st = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in st.encode(frame):
            c.mux(packet)
        for packet in st.encode():
            c.mux(packet)
    out["no_video_stream"] = (p, "unreadable")
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_files_raise_kind_and_path(video_file, tmp_path, backend):
    for name, (path, kind) in make_bad_files(tmp_path, video_file[0]).items():
        with pytest.raises(R.VideoReadError) as info:
            R.read_frames(path, lambda L: [0, L - 1], backend=backend)  # the last frame finds truncation
        assert info.value.kind == kind, name
        assert path in str(info.value)


def test_too_short_and_index_callable(video_file):
    path, _ = video_file
    with pytest.raises(R.VideoReadError, match="too_short") as info:
        R.read_frames(path, [0], min_frames=22)
    assert path in str(info.value)
    frames, n, idx = R.read_frames(path, lambda L: np.array([[0, L - 1], [1, 2]]), height=16, width=24)
    assert n == 21 and frames.shape == (2, 2, 16, 24, 3) and idx.tolist() == [[0, 20], [1, 2]]


def test_timeout_stops_a_stuck_read():
    t0 = time.perf_counter()
    with pytest.raises(R.VideoReadError, match="timeout") as info:
        R.call_with_timeout(lambda: time.sleep(5), 0.2, "/data/stuck.avi")
    assert time.perf_counter() - t0 < 2
    assert info.value.kind == "timeout" and "/data/stuck.avi" in str(info.value)
    assert R.call_with_timeout(lambda: 42, 1.0, "x") == 42
    with pytest.raises(ZeroDivisionError):
        R.call_with_timeout(lambda: 1 / 0, 1.0, "x")


@pytest.mark.parametrize("suffix", [".avi", ".mp4", ".mkv"])
def test_pyav_seek_matches_sequential_decode(tmp_path, suffix, monkeypatch):
    path = str(tmp_path / ("long" + suffix))
    write_video(path, render_video("DownThenRight", 75, 32, 40, seed=4))
    r = R.open_video(path, backend="pyav")
    assert r.num_frames == 75
    rng = np.random.default_rng(0)
    for _ in range(8):
        idx = rng.integers(0, 75, size=int(rng.integers(1, 12)))
        monkeypatch.setattr(R.PyAVReader, "seek", True)
        seeked = r.get_frames(idx)
        monkeypatch.setattr(R.PyAVReader, "seek", False)
        np.testing.assert_array_equal(seeked, r.get_frames(idx))
    if "decord" in BACKENDS:
        d = R.open_video(path, backend="decord").get_frames(idx)
        assert np.abs(d.astype(np.int16) - seeked.astype(np.int16)).mean() < 2.0
