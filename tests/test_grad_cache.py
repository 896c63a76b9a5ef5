"""Gradient caching (dualvar.engine.grad_cache) on one process, and the backbones' normalisation options.

- With per-sample normalisation (frozen-statistics BatchNorm, GroupNorm) the cached step equals the unchunked
  step: parameter gradients to 1e-9 relative (per parameter, ||g - g_ref|| / ||g_ref||), same loss, same
  MoCo queues and key encoder, for SimCLR and MoCo, chunks that divide the batch and chunks that do not.
  Models and views are float64, so the comparison is not blurred by float32 rounding, which differs
  between batch sizes (in float32 the same comparisons give up to ~2e-5 with GroupNorm, ~1e-6 otherwise).
- With train-mode BatchNorm and dropout it equals the same chunks run forward with a graph one after the
  other (per-chunk batch statistics, one running-statistics update per chunk, the dropout masks of pass 1
  replayed in pass 2, the RNG left where that run leaves it), and differs from the unchunked step (the
  documented caveat).
"""
import os

import pytest
import torch
from torch import nn

from dualvar.engine.frameworks import Embeddings, build_framework, make_views
from dualvar.engine.grad_cache import GradCache, chunk_bounds, concat_embeddings
from dualvar.engine.models import build_backbone
from dualvar.engine.objectives import DualVarLossConfig, build_objective
from helpers import one_thread  # noqa: F401  (one_thread: an autouse fixture)
from test_frameworks import make_batch

N = 8  # clips in the batch


class DropoutBackbone(nn.Module):
    """A backbone with an RNG-dependent layer: dropout on the pooled feature."""

    def __init__(self, inner: nn.Module, p: float = 0.3):
        super().__init__()
        self.inner, self.drop, self.feature_dim = inner, nn.Dropout(p), inner.feature_dim

    def forward(self, x):
        return self.drop(self.inner(x))


def setup(framework, norm, *, dropout=False, mode="clip-sr-tc"):
    torch.manual_seed(0)
    backbone = build_backbone("tiny", norm=norm)
    if dropout:
        backbone = DropoutBackbone(backbone)
    model = build_framework(framework, backbone, mode=mode, momentum=0.9).train().double()
    if framework == "moco":  # a key encoder that differs from the query encoder, so every EMA step shows
        with torch.no_grad():
            for p in model._key_params():
                p.add_(torch.randn_like(p), alpha=0.05)
    obj = build_objective(DualVarLossConfig(framework=framework, mode=mode), queue_size=16,
                          generator=torch.Generator().manual_seed(1)).double()
    views, perm = make_views(make_batch(B=N, T=8, H=16, W=16, seed=2), "cpu", n_series=2,
                             generator=torch.Generator().manual_seed(3), out_dtype=torch.float64)
    return model, obj, views, perm


def finish(model, obj, emb, out):
    obj.update(emb)
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return dict(loss=out.total.detach(), grads=grads, emb=emb, rng=torch.rand(4),
                model={k: v.clone() for k, v in model.state_dict().items()},
                objective={k: v.clone() for k, v in obj.state_dict().items()})


def step_unchunked(model, obj, views, perm):
    emb = model(views, perm)
    out = obj(emb)
    out.total.backward()
    return finish(model, obj, emb, out)


def step_cached(model, obj, views, perm, chunk):
    gc = GradCache(model, chunk)
    emb = gc.embed(views.shape[0], lambda lo, hi: (views[lo:hi], perm[lo:hi]))
    assert all(t.is_leaf and t.requires_grad for t in (emb.z0, emb.z1, emb.u0, emb.u2, emb.y_shuf))
    out = obj(emb)
    out.total.backward()
    gc.backward(emb)
    return finish(model, obj, emb, out)


def step_chunks_with_graph(model, obj, views, perm, chunk):
    """The reference for any backbone: the chunks forward with a graph one after the other, one loss on
    their concatenated embeddings, one backward (MoCo: one EMA step first, none per chunk)."""
    momentum = getattr(model, "momentum", None)
    if momentum is not None:
        model.momentum_update()
        model.momentum = 1.0  # lerp weight 0: the per-call EMA step leaves the key encoder alone
    pieces = [model(views[lo:hi], perm[lo:hi]) for lo, hi in chunk_bounds(views.shape[0], chunk)]
    if momentum is not None:
        model.momentum = momentum
    emb = concat_embeddings(pieces)
    out = obj(emb)
    out.total.backward()
    return finish(model, obj, emb, out)


def assert_same_step(got, ref, *, grad_rtol=1e-9, what=""):
    assert got["grads"].keys() == ref["grads"].keys()
    errs = {k: float((got["grads"][k] - ref["grads"][k]).norm() / ref["grads"][k].norm().clamp_min(1e-30))
            for k in ref["grads"]}
    assert max(errs.values()) < grad_rtol, (what, sorted(errs.items(), key=lambda kv: -kv[1])[:3])
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-12, atol=1e-12)
    for part in ("model", "objective"):  # BN statistics, key encoder, queues and their pointers
        assert got[part].keys() == ref[part].keys()
        for k in ref[part]:
            torch.testing.assert_close(got[part][k], ref[part][k], rtol=1e-10, atol=1e-12, msg=f"{what} {part} {k}")


@pytest.mark.parametrize("framework,norm,chunk", [("simclr", "frozen_bn", 3), ("simclr", "group", 1),
                                                  ("moco", "frozen_bn", 3), ("moco", "group", 4)])
def test_cached_step_equals_unchunked_step(framework, norm, chunk):
    ref = step_unchunked(*setup(framework, norm))
    got = step_cached(*setup(framework, norm), chunk)
    assert_same_step(got, ref, what=f"{framework} {norm} chunk {chunk}")
    if framework == "moco":
        assert int(got["objective"]["clip_queue.ptr"]) == N


@pytest.mark.parametrize("framework", ["simclr", "moco"])
def test_batchnorm_and_dropout_follow_the_chunks(framework):
    ref = step_chunks_with_graph(*setup(framework, "bn", dropout=True), 3)
    got = step_cached(*setup(framework, "bn", dropout=True), 3)
    assert_same_step(got, ref, what=framework)  # same masks replayed, BN statistics updated once per chunk
    assert torch.equal(got["rng"], ref["rng"])  # the generator ends where the one-pass run leaves it
    calls = 2  # backbone calls per chunk (SimCLR: views 0-2, then view 3; MoCo query: view 0, then views 2-3)
    assert int(got["model"]["backbone.inner.stem.1.num_batches_tracked"]) == calls * len(chunk_bounds(N, 3))
    # with train-mode BatchNorm the chunked step is not the unchunked one (per-chunk statistics)
    whole = step_unchunked(*setup(framework, "bn"))
    plain = step_cached(*setup(framework, "bn"), 3)
    assert not torch.allclose(whole["loss"], plain["loss"])


def test_chunk_and_call_order_errors():
    model, obj, views, perm = setup("simclr", "frozen_bn")
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        GradCache(model, 0)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        chunk_bounds(0, 2)
    assert chunk_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    gc = GradCache(model, 3)
    with pytest.raises(RuntimeError, match="embed"):
        gc.backward(Embeddings(z0=torch.zeros(1, 2), z1=torch.zeros(1, 2)))
    emb = gc.embed(N, lambda lo, hi: (views[lo:hi], perm[lo:hi]))
    with pytest.raises(RuntimeError, match="back-propagate the loss"):
        gc.backward(emb)
    with pytest.raises(ValueError, match="hi - lo samples"):
        GradCache(model, 3).embed(N, lambda lo, hi: (views[:1], perm[:1]))


# ----------------------------------------------------------------------------- normalisation options
def test_frozen_batchnorm_and_groupnorm_backbones():
    from dualvar.engine.models.backbones import FrozenBatchNorm3d, group_norm_groups
    torch.manual_seed(0)
    bn = build_backbone("tiny")
    with torch.no_grad():  # non-trivial statistics, as loaded weights would have
        for m in bn.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dualvar-bn-{os.getpid()}.pt")
    torch.save(bn.state_dict(), path)
    try:
        frozen = build_backbone("tiny", norm="frozen_bn", weights=path)  # weights load, then BN is frozen
    finally:
        os.remove(path)
    assert frozen.state_dict().keys() == bn.state_dict().keys()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in frozen.modules())
    assert sum(isinstance(m, FrozenBatchNorm3d) for m in frozen.modules()) == \
        sum(isinstance(m, nn.BatchNorm3d) for m in bn.modules())
    x = torch.randn(3, 3, 4, 16, 16)
    bn.eval()
    frozen.train()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    out = frozen(x)
    torch.testing.assert_close(out, bn(x), rtol=1e-5, atol=1e-6)  # train mode normalises as BN's eval mode
    torch.testing.assert_close(frozen(x[:1]), out[:1], rtol=1e-5, atol=1e-6)  # per sample
    assert all(torch.equal(v, before[k]) for k, v in frozen.state_dict().items())  # statistics never move
    out.sum().backward()
    assert all(p.grad is not None for p in frozen.parameters())  # affine weights still train
    # SyncBatchNorm conversion leaves frozen statistics alone
    assert not any(isinstance(m, nn.SyncBatchNorm)
                   for m in nn.SyncBatchNorm.convert_sync_batchnorm(frozen).modules())

    group = build_backbone("tiny", norm="group").train()
    norms = [m for m in group.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in group.modules())
    assert {(m.num_groups, m.num_channels) for m in norms} == {(8, 8), (16, 16), (32, 32), (32, 64)}
    assert group_norm_groups(83) == 1 and group_norm_groups(144) == 16 and group_norm_groups(512) == 32
    group, x = group.double(), x.double()
    torch.testing.assert_close(group(x[1:2]), group(x)[1:2], rtol=1e-12, atol=1e-12)  # per sample
    with pytest.raises(ValueError, match="norm must be one of"):
        build_backbone("tiny", norm="layer")


# ----------------------------------------------------------------------------- trainer and batch planning
def _trainer_config(tmp_path, **train):
    from dualvar.engine.config import from_dict
    root = str(tmp_path / "synthetic")
    return from_dict({
        "name": "gc",
        "data": dict(dataset="synthetic", root=root, holdout=0, frames=4, stride=2, crop=16, size=16, long=21,
                     batch_size=6, num_workers=0, synthetic_classes=2, synthetic_videos_per_class=6,
                     synthetic_frames=12, synthetic_height=16, synthetic_width=21),
        "model": dict(backbone="tiny", framework="moco", mode="clip-sr-tc", norm="frozen_bn"),
        "loss": dict(queue_size=12),
        "train": dict(epochs=1, max_steps=2, device="cpu", log_every=1, progress=False, tensorboard=False, **train),
        "checkpoint": dict(every_steps=0),
    })


def test_trainer_with_grad_cache_matches_the_plain_trainer(tmp_path, capsys):
    import json

    from dualvar.engine.trainer import Trainer
    runs = {}
    for name, chunk in (("plain", 0), ("chunk4", 4), ("auto", "auto")):
        trainer = Trainer(_trainer_config(tmp_path, grad_cache_chunk=chunk), str(tmp_path / name))
        summary = trainer.fit()
        with open(tmp_path / name / "metrics.jsonl") as f:
            runs[name] = [json.loads(line) for line in f]
        if name == "chunk4":
            assert summary["grad_cache_chunk"] == 4
    assert "grad_cache_chunk=auto: the probe step of 4 clips" in capsys.readouterr().out
    assert trainer.batch_plan is not None and trainer.batch_plan.chunk == 6  # tiny clips: the batch fits
    for name in ("chunk4", "auto"):
        for a, b in zip(runs["plain"], runs[name]):
            for k in ("clip_nce", "tc_nce", "sr_rank_view0", "sr_rank_view2", "total", "grad_norm"):
                assert b[k] == pytest.approx(a[k], rel=1e-5), (name, a["step"], k)


def test_plan_chunk_picks_the_largest_chunk_that_fits():
    from dualvar.engine.batch_plan import choose_chunk, host_free_bytes, plan_chunk
    MiB = 2 ** 20
    assert choose_chunk(per_clip=10 * MiB, free=1000 * MiB, reserve=100 * MiB, clips=256, margin=0.1) == 81
    assert choose_chunk(per_clip=10 * MiB, free=1000 * MiB, reserve=0, clips=64, margin=0.2) == 64
    assert choose_chunk(per_clip=10 * MiB, free=5 * MiB, reserve=0, clips=64, margin=0.2) == 1
    assert choose_chunk(per_clip=10 * MiB, free=5 * MiB, reserve=0, clips=64, margin=0.2, min_chunk=2) == 2
    held = []

    def probe(c):  # ~c * 8 MiB touched, then released
        held.append(torch.ones(c * 2 * MiB))
        held.clear()

    plan = plan_chunk(probe, 512, torch.device("cpu"), margin=0.25, free=2048 * MiB, reserve=48 * MiB)
    assert plan.probe == 4 and 7.5 * MiB <= plan.per_clip <= 12 * MiB, plan
    assert plan.chunk == (2048 - 48) * MiB * 3 // 4 // plan.per_clip
    assert plan.expected_peak == plan.in_use + 48 * MiB + plan.chunk * plan.per_clip
    assert f"chunk {plan.chunk}" in plan.describe() and "expected peak" in plan.describe()
    assert 0 < host_free_bytes()
    with pytest.raises(ValueError, match="margin"):
        plan_chunk(probe, 8, torch.device("cpu"), margin=1.0)
