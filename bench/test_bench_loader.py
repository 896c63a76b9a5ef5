"""Pretraining loader throughput on the synthetic set: decode + crop (DataLoader workers) + transfer +
batched device augmentation (`to_views`), for 0, 1 and 2 workers.

One round = BATCHES batches of BATCH videos (3 views each); clips/s counts views. Worker start-up is
outside the timed rounds (persistent workers, one warm-up round). extra_info also gives the share of
single-process time spent in decode + crop (`dataset[i]`) vs device augmentation (`to_views`).
"""
import time

import pytest
import torch

from bench_helpers import HAS_CUDA, run_timed
from dualvar.engine.data import VideoClipDataset, build_loader, load_index, to_views
from dualvar.engine.data.bench import ensure_synthetic_index

BATCH, BATCHES = 8, 4
DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return ensure_synthetic_index(str(tmp_path_factory.mktemp("synthetic")))


def forever(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


@pytest.fixture(scope="module")
def shares(index):
    ds = VideoClipDataset(load_index(index, "train", only_ok=True), "pretrain")
    t0 = time.perf_counter()
    items = [ds[i] for i in range(BATCH)]
    t_decode = time.perf_counter() - t0
    batch = torch.utils.data.default_collate(items)
    to_views(batch, DEVICE)
    t0 = time.perf_counter()
    to_views(batch, DEVICE)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    t_aug = time.perf_counter() - t0
    return t_decode / (t_decode + t_aug), t_aug / (t_decode + t_aug)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_pretrain_loader(benchmark, index, shares, workers):
    loader = build_loader(index, "pretrain", "train", BATCH, num_workers=workers, device=DEVICE)
    it = forever(loader)

    def rounds():
        n = 0
        for _ in range(BATCHES):
            batch = next(it)
            x = to_views(batch, DEVICE)
            n += x.shape[0] * x.shape[1]
        return x, n

    x, n = run_timed(benchmark, rounds, DEVICE, rounds=3, warmup=1)
    assert x.shape == (BATCH, 3, 3, 16, 112, 112) and torch.isfinite(x).all()
    assert sum(v for k, v in loader.failures().items() if k != "attempts") == 0
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(workers=workers, device=DEVICE, clips_per_s=n / median,
                                videos_per_s=n / 3 / median, decode_share=shares[0], augment_share=shares[1])
