"""Datasets and loader: item contents vs the sampling formulas, bad files, workers, sampler resume."""
import gc
import os
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from dualvar.engine.data import augment as A
from dualvar.engine.data import sampling
from dualvar.engine.data.dataset import (ClipConfig, DataFailureError, ResumableDistributedSampler, VideoClipDataset,
                                         VideoLoader, build_loader, to_views)
from dualvar.engine.data.index import build_index, load_index
from dualvar.engine.data.reader import open_video
from dualvar.engine.data.synthetic import write_synthetic_dataset

CFG = dict(frames=4, stride=3, size=40, long=56, crop=32)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth"))
    write_synthetic_dataset(root, classes=3, videos_per_class=3, frames=24, height=64, width=64, seed=9, workers=1)
    out = os.path.join(root, "index.jsonl")
    build_index("ucf101", root, out)
    return root, out


def test_pretrain_item_matches_sampling_and_crop(synth):
    _, index = synth
    entries = load_index(index, "train")
    cfg = ClipConfig(**CFG)
    ds = VideoClipDataset(entries, "pretrain", cfg, seed=11)
    item = ds[(2, 5)]
    assert item["video"].shape == (3, 4, 32, 32, 3) and item["video"].dtype == torch.uint8
    assert item["index"].item() == 2 and not item["substituted"].item()
    # replay the generator: indices, then per-view crop, then per-view params
    rng = np.random.default_rng([11, 5, 2])
    L = entries[2]["n_frames"]
    idx, rev = sampling.pretrain_indices(L, rng, 4, 3)
    frames = open_video(entries[2]["path"], height=40, width=56).get_frames(idx.reshape(-1)).reshape(3, 4, 40, 56, 3)
    crops = [A.random_crop(frames[v], rng, 32) for v in range(3)]
    params = [A.sample_pretrain_view_params(rng, v) for v in range(3)]
    np.testing.assert_array_equal(item["video"].numpy(), np.stack(crops))
    assert item["time_reverse"].item() == rev
    np.testing.assert_allclose(item["jitter"].numpy(), np.stack([p["jitter"] for p in params]))
    assert item["blur_apply"].tolist() == [p["blur_apply"] for p in params]
    assert not item["hflip"].any()
    assert item["label"].item() == entries[2]["label"]
    # deterministic per (seed, epoch, index); another epoch differs
    np.testing.assert_array_equal(ds[(2, 5)]["video"].numpy(), item["video"].numpy())
    assert not torch.equal(ds[(2, 6)]["jitter"], item["jitter"])


def test_eval_and_finetune_items(synth):
    _, index = synth
    entries = load_index(index, "test")
    cfg = ClipConfig(**CFG, eval_clips=5)
    ev = VideoClipDataset(entries, "eval", cfg)[1]
    assert ev["video"].shape == (5, 4, 32, 32, 3) and "jitter" not in ev
    idx = sampling.eval_indices(entries[1]["n_frames"], 4, 3, 5)
    frames = open_video(entries[1]["path"], height=40, width=56).get_frames(idx.reshape(-1)).reshape(5, 4, 40, 56, 3)
    np.testing.assert_array_equal(ev["video"].numpy(), frames[:, :, 4:36, 12:44])  # (40-32)/2, (56-32)/2
    ft = VideoClipDataset(entries, "finetune", cfg)
    flips = [bool(ft[(0, e)]["hflip"][0]) for e in range(30)]
    assert 5 < sum(flips) < 25
    item = ft[(0, 0)]
    assert item["video"].shape == (1, 4, 32, 32, 3) and not item["blur_apply"].any()


def test_reference_resize_quirk_shapes(synth):
    _, index = synth
    cfg = ClipConfig(frames=2, stride=1, size=40, long=56, crop=32, reference_resize=True)
    item = VideoClipDataset(load_index(index, "test"), "eval", cfg, seed=0)[0]
    assert item["video"].shape == (10, 2, 32, 32, 3)
    with pytest.raises(ValueError, match="crop"):
        ClipConfig(size=40, long=56, crop=48)


def bad_entries(tmp_path, good):
    d = str(tmp_path)
    paths = {"missing": os.path.join(d, "gone.avi")}
    paths["empty"] = os.path.join(d, "empty.avi")
    open(paths["empty"], "wb").close()
    paths["unreadable"] = os.path.join(d, "junk.avi")
    with open(paths["unreadable"], "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    paths["truncated"] = os.path.join(d, "trunc.avi")
    data = open(good["path"], "rb").read()
    with open(paths["truncated"], "wb") as f:
        f.write(data[: len(data) // 2])
    return [{"path": p, "label": 0} for p in paths.values()]


def test_bad_files_are_substituted_and_counted(synth, tmp_path):
    _, index = synth
    good = load_index(index, "train")
    entries = good + bad_entries(tmp_path, good[0])
    cfg = ClipConfig(**CFG, max_failure_fraction=1.0, min_frames=20)
    ds = VideoClipDataset(entries + [dict(good[0], path=good[0]["path"])], "pretrain", cfg, seed=1)
    out = [ds[(i, 0)] for i in range(len(ds))]
    for i, item in enumerate(out):
        assert item["video"].shape == (3, 4, 32, 32, 3)
        assert item["substituted"].item() == (len(good) <= i < len(good) + 4)
        assert ds.entries[item["index"].item()]["path"] in {e["path"] for e in good}
    f = ds.failures()
    assert f["missing"] >= 1 and f["empty"] >= 1 and f["unreadable"] >= 1
    assert f["attempts"] == len(ds) + sum(f[k] for k in ("missing", "empty", "unreadable", "too_short", "timeout"))
    # too short: fewer frames than min_frames
    short = VideoClipDataset(good, "pretrain", ClipConfig(**CFG, min_frames=25, max_failure_fraction=1.0,
                                                          max_substitutions=3))
    with pytest.raises(DataFailureError, match="4 reads in a row"):
        short[0]
    assert short.failures()["too_short"] == 4


def test_failure_fraction_stops_with_examples(synth, tmp_path):
    _, index = synth
    good = load_index(index, "train")[:2]
    ds = VideoClipDataset(good + bad_entries(tmp_path, good[0]), "pretrain",
                          ClipConfig(**CFG, max_failure_fraction=0.2, min_attempts=4), seed=0)
    with pytest.raises(DataFailureError) as info:
        for i in range(len(ds)):
            ds[i]
    msg = str(info.value)
    assert "more than the allowed fraction 0.2" in msg and str(tmp_path) in msg


def test_timeout_in_dataset(synth, monkeypatch):
    _, index = synth
    from dualvar.engine.data import reader
    real = reader.open_video

    def slow_open(path, *a, **k):
        if path.endswith("c01.avi"):
            time.sleep(3)
        return real(path, *a, **k)

    monkeypatch.setattr(reader, "open_video", slow_open)
    good = load_index(index, "train")
    ds = VideoClipDataset(good, "pretrain", ClipConfig(**CFG, timeout_s=0.3, max_failure_fraction=1.0), seed=0)
    slow = next(i for i, e in enumerate(good) if e["path"].endswith("c01.avi"))
    t0 = time.perf_counter()
    item = ds[slow]
    assert time.perf_counter() - t0 < 2.5 + 0.3 * 3
    assert item["substituted"].item() and ds.failures()["timeout"] >= 1


@pytest.mark.parametrize("n,replicas,drop_last", [(10, 1, False), (10, 3, False), (7, 2, True), (1, 3, False)])
def test_sampler_matches_distributed_sampler(n, replicas, drop_last):
    for rank in range(replicas):
        ours = ResumableDistributedSampler(list(range(n)), replicas, rank, shuffle=True, seed=4, drop_last=drop_last)
        theirs = DistributedSampler(range(n), replicas, rank, shuffle=True, seed=4, drop_last=drop_last)
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs) and len(ours) == len(theirs)


def test_sampler_state_resume():
    s = ResumableDistributedSampler(11, 2, 1, seed=3, tag_epoch=True)
    s.set_epoch(2)
    full = list(s)
    s.advance(4)
    state = s.state_dict()
    t = ResumableDistributedSampler(11, 2, 1, seed=3, tag_epoch=True)
    t.load_state_dict(state)
    assert list(t) == full[4:] and all(e == 2 for _, e in full)
    with pytest.raises(ValueError, match="world size"):
        ResumableDistributedSampler(11, 3, 1, seed=3).load_state_dict(state)


def batches_of(loader, n=None):
    out = []
    for i, b in enumerate(loader):
        out.append({k: v.clone() for k, v in b.items()})
        if n is not None and i + 1 == n:
            break
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_loader_independent_of_workers_and_resumes(synth):
    _, index = synth
    cfg = ClipConfig(**CFG)
    l0 = build_loader(index, "pretrain", "train", 2, config=cfg, num_workers=0, seed=7)
    l2 = build_loader(index, "pretrain", "train", 2, config=cfg, num_workers=2, seed=7)
    for loader in (l0, l2):
        loader.set_epoch(1)
    ref = batches_of(l0)
    assert len(ref) == 3
    assert_same_batches(ref, batches_of(l2))
    # counters from worker processes reach the main process
    assert l2.failures()["attempts"] == 6 and l0.failures()["attempts"] == 6
    # interrupted after one batch, saved, restored into a fresh loader: the rest is identical
    l0.set_epoch(1)
    first = batches_of(l0, 1)
    state = l0.state_dict()
    assert state["position"] == 2 and state["epoch"] == 1
    resumed = build_loader(index, "pretrain", "train", 2, config=cfg, num_workers=1, seed=7)
    resumed.load_state_dict(state)
    assert_same_batches(first + batches_of(resumed), ref)
    # next epoch differs, and persistent workers see the new epoch
    l0.set_epoch(2)
    l2.set_epoch(2)
    ref2 = batches_of(l0)
    assert not torch.equal(ref2[0]["video"], ref[0]["video"])
    assert_same_batches(ref2, batches_of(l2))
    x = to_views(ref[0], "cpu")
    assert x.shape == (2, 3, 3, 4, 32, 32) and x.dtype == torch.float32


def test_worker_failures_aggregate_and_error_propagates(synth, tmp_path):
    _, index = synth
    good = load_index(index, "train")
    entries = good + bad_entries(tmp_path, good[0])[:2]
    ds = VideoClipDataset(entries, "pretrain", ClipConfig(**CFG, max_failure_fraction=1.0), seed=0)
    loader = VideoLoader(ds, 2, num_workers=2, shuffle=False, drop_last=False)
    n = sum(b["video"].shape[0] for b in loader)
    f = loader.failures()
    failed = sum(f[k] for k in ("missing", "empty", "unreadable", "too_short", "timeout"))
    assert n == len(entries) and f["missing"] >= 1 and f["empty"] >= 1 and f["unreadable"] == 0
    assert f["attempts"] == len(entries) + failed  # every read of every worker is counted once
    del loader
    strict = VideoClipDataset(entries, "pretrain", ClipConfig(**CFG, max_failure_fraction=0.1, min_attempts=2))
    # (after a worker raises, torch's DataLoader takes ~5 s per worker to shut down: one worker here)
    with pytest.raises(DataFailureError, match="gone.avi|empty.avi"):
        list(VideoLoader(strict, 2, num_workers=1, shuffle=False, drop_last=False))
    gc.collect()  # shut those workers down here, not during a later test


def test_bench_loader_reports_throughput_and_shares(synth, capsys):
    from dualvar.engine.cli import main as dualvar_main
    from dualvar.engine.data.bench import bench_loader
    _, index = synth
    r = bench_loader(index, num_workers=0, batch_size=2, batches=1, warmup=1)
    assert r["clips_per_s"] > 0 and abs(r["clips_per_s"] - 3 * r["videos_per_s"]) < 1e-9
    assert abs(r["decode_share"] + r["augment_share"] - 1) < 1e-9 and 0 < r["decode_share"] < 1
    root = os.path.dirname(index)
    assert dualvar_main(["data", "bench", "--root", root, "--workers", "0", "--batches", "1", "--batch-size", "2",
                         "--no-colour"]) == 0
    assert "workers 0:" in capsys.readouterr().out


def test_holdout_split_and_short_count(synth):
    from dualvar.engine.data.dataset import holdout_split
    entries = [{"path": f"v{i}.avi", "label": i % 3, "n_frames": 10 + 7 * i} for i in range(23)]
    train, val = holdout_split(entries, n=5, seed=1)
    assert len(val) == 5 and len(train) == 18
    assert sorted(e["path"] for e in train + val) == sorted(e["path"] for e in entries)
    assert holdout_split(entries, n=5, seed=1) == (train, val)
    assert holdout_split(entries, n=5, seed=2)[1] != val
    with pytest.raises(ValueError, match="hold out"):
        holdout_split(entries, n=24)
    ds = VideoClipDataset(entries, "pretrain", ClipConfig(**CFG))  # span (4 - 1) * 3 + 1 = 10
    assert ds.shorter_than_clip() == sum(1 for e in entries if e["n_frames"] < 10)
    ds = VideoClipDataset(entries, "pretrain", ClipConfig(**dict(CFG, stride=20)))  # span 61
    assert ds.shorter_than_clip() == sum(1 for e in entries if e["n_frames"] < 61) == 8
