"""One pretraining step of the tiny backbone on the CPU as the batch grows: plain-torch losses and view
layout (`loss.backend=torch`) vs the fused kernels (`auto`).

The step is `Trainer.train_step` of the demo preset's clip size (8 frames, 56 x 56 crops, SimCLR + DualVar
clip-sr-tc): views (one frame-permutation call + colour augmentation) -> backbone and heads -> objective ->
backward -> SGD step. The batch is collated from the generated synthetic set once, outside the timed
rounds (loader time is bench/test_bench_loader.py's). clips_per_s counts the 3 sampled clips per video.
peak_mb: the resident-set growth of one step in a fresh process (VmHWM reset just before it), with the
extension, BLAS and thread pools loaded first: activations, gradients and the optimizer's first state.
"""
import pytest
import torch

from bench_helpers import median_s, peak_mb_in_fresh_process, run_timed

BATCHES = (4, 8, 16, 32)
BACKENDS = ("torch", "auto")
CLIP = dict(frames=8, stride=2, crop=56, size=64, long=85)
SYNTH = dict(synthetic_classes=4, synthetic_videos_per_class=12, synthetic_frames=24, synthetic_height=64,
             synthetic_width=85)


def make_trainer(root: str, backend: str, run_dir: str):
    from dualvar.engine.config import from_dict
    from dualvar.engine.trainer import Trainer
    cfg = from_dict({
        "name": "bench",
        "data": dict(dataset="synthetic", root=root, holdout=0, batch_size=4, num_workers=0, **CLIP, **SYNTH),
        "model": dict(backbone="tiny", framework="simclr", mode="clip-sr-tc"),
        "loss": dict(backend=backend),
        "optim": dict(name="sgd", lr=0.01),
        "train": dict(device="cpu", progress=False, tensorboard=False, epochs=1),
    })
    return Trainer(cfg, run_dir)


def make_batch(trainer, batch: int) -> dict:
    ds = trainer.loader.dataset
    return torch.utils.data.default_collate([ds[i % len(ds)] for i in range(batch)])


def step_factory(root: str, batch: int, backend: str, run_dir: str):
    """(setup, step, device, warmup) for bench_helpers.measure_peak_mb, run in a fresh process."""
    trainer = make_trainer(root, backend, run_dir)
    data = make_batch(trainer, batch)

    def warmup():  # the extension and thread pools, with a one-clip forward of the views
        from dualvar.engine.frameworks import make_views
        make_views(make_batch(trainer, 1), "cpu", n_series=2, generator=torch.Generator(), backend=backend)

    return (lambda: (data,)), trainer.train_step, "cpu", warmup


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from dualvar.engine.config import DataConfig
    from dualvar.engine.trainer import ensure_synthetic
    path = str(tmp_path_factory.mktemp("synthetic") / "set")
    ensure_synthetic(DataConfig(dataset="synthetic", root=path, **CLIP, **SYNTH))
    return path


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", BATCHES)
def test_train_step(benchmark, root, tmp_path, batch, backend):
    trainer = make_trainer(root, backend, str(tmp_path / "run"))
    data = make_batch(trainer, batch)
    run_timed(benchmark, lambda: trainer.train_step(data), "cpu", rounds=5, warmup=1)
    from dualvar.kernels import last_backend
    t = median_s(benchmark)
    benchmark.extra_info.update(
        batch=batch, backend=backend, threads=torch.get_num_threads(),
        ran=repr({op: last_backend(op) for op in ("permute_frames", "contrastive", "shuffle_rank")}))
    if t is not None:  # not under --benchmark-disable (a smoke run): the fresh process costs seconds
        benchmark.extra_info.update(
            clips_per_s=round(3 * batch / t, 1),
            peak_mb=peak_mb_in_fresh_process("test_bench_train_step", "step_factory", root, batch, backend,
                                             str(tmp_path / "fresh")))
