"""Views, SimCLR and MoCo (docs/method.md §1.4, §2.2, §2.3, §8.8): the four views from one permute_frames call
against naive torch references and `to_views`, the embeddings per mode, BatchNorm batch composition, MoCo's
momentum encoder, and a few SGD steps of every framework x mode on a fixed batch (tiny backbone)."""
import copy

import numpy as np
import pytest
import torch

import dualvar.kernels as K
from dualvar.engine.data import augment, to_views
from dualvar.engine.frameworks import Embeddings, MoCo, SimCLR, build_framework, make_views
from dualvar.engine.models import build_backbone
from dualvar.engine.objectives import MODES, DualVarLossConfig, build_objective
from helpers import one_thread  # noqa: F401  (one_thread: an autouse fixture)


def make_batch(B=4, T=8, H=16, W=16, seed=0):
    """A loader-like pretraining batch: uint8 video (B, 3, T, H, W, C) and per-view colour parameters,
    with jitter and blur forced on for some views so every colour op runs."""
    rng = np.random.default_rng(seed)
    video = torch.from_numpy(rng.integers(0, 256, size=(B, 3, T, H, W, 3), dtype=np.uint8))
    params = [[augment.sample_pretrain_view_params(rng, v) for v in range(3)] for _ in range(B)]
    for b in range(B):
        params[b][2]["jitter_apply"] = params[b][2]["blur_apply"] = b % 2 == 0
        params[b][1]["jitter_apply"] = True
    batch = {"video": video,
             "jitter": torch.from_numpy(np.stack([[p["jitter"] for p in row] for row in params])),
             "jitter_order": torch.from_numpy(np.stack([[p["jitter_order"] for p in row] for row in params])),
             "hflip": torch.zeros(B, 3, dtype=torch.bool)}
    for name in ("jitter_apply", "blur_apply"):
        batch[name] = torch.tensor([[p[name] for p in row] for row in params])
    batch["blur_sigma"] = torch.tensor([[float(p["blur_sigma"]) for p in row] for row in params])
    return batch


def naive_segment_shuffle(x, perm):
    """x (B, C, T, H, W), perm (B, s): shuffled segment j = original segment perm[b, j], by slicing."""
    B, s = perm.shape
    L = x.shape[2] // s
    return torch.stack([torch.cat([x[b, :, int(perm[b, j]) * L:(int(perm[b, j]) + 1) * L] for j in range(s)], dim=1)
                        for b in range(B)])


# ------------------------------------------------------------------------------------------ views
@pytest.mark.parametrize("s,derangement", [(2, False), (2, True), (4, False), (8, True)])
def test_shuffled_view_is_view2_with_segments_permuted(s, derangement):
    batch = make_batch()
    views, perm = make_views(batch, "cpu", n_series=s, generator=torch.Generator().manual_seed(3),
                             derangement=derangement)
    assert views.shape == (4, 4, 3, 8, 16, 16) and views.dtype == torch.float32
    assert perm.shape == (4, s) and perm.dtype == torch.int64
    assert torch.equal(perm.sort(dim=1).values, torch.arange(s).expand(4, s))
    if derangement:
        assert not bool((perm == torch.arange(s)).any())
    # colour ops act per frame, so shuffling after them equals shuffling before them
    torch.testing.assert_close(views[:, 3], naive_segment_shuffle(views[:, 2], perm), rtol=0, atol=1e-6)
    # and the shuffled frames are view 2's raw frames in permuted order (check on the un-augmented pixels)
    plain = {k: v for k, v in batch.items() if k in ("video", "hflip")}
    pv, pperm = make_views(plain, "cpu", n_series=s, generator=torch.Generator().manual_seed(3),
                           derangement=derangement)
    assert torch.equal(pperm, perm)
    raw = batch["video"][:, 2].permute(0, 4, 1, 2, 3).float() / 255  # (B, C, T, H, W)
    mean = torch.tensor(augment.IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(augment.IMAGENET_STD).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(pv[:, 3], (naive_segment_shuffle(raw, perm) - mean) / std, rtol=1e-6, atol=1e-6)


def test_views_0_to_2_equal_to_views():
    batch = make_batch()
    views, _ = make_views(batch, "cpu", n_series=2, generator=torch.Generator().manual_seed(0))
    ref = to_views(batch, "cpu")
    torch.testing.assert_close(views[:, :3], ref, rtol=0, atol=1e-6)
    assert not torch.allclose(views[:, 0], views[:, 2])  # independent augmentation of the same frames
    # bfloat16 views are the float32 views cast
    v16, _ = make_views(batch, "cpu", n_series=2, generator=torch.Generator().manual_seed(0), out_dtype=torch.bfloat16)
    assert v16.dtype == torch.bfloat16 and torch.equal(v16, views.to(torch.bfloat16))


def test_make_views_one_permute_call_and_view_major_memory(monkeypatch):
    calls = []
    real = K.permute_frames

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(K, "permute_frames", counting)
    views, _ = make_views(make_batch(B=3), "cpu", n_series=2, generator=torch.Generator().manual_seed(0))
    assert calls == [(3, 24, 16, 16, 3)]  # one call: each sample's 3 clips as 3T frames
    assert views[:, 0:3].transpose(0, 1).is_contiguous() and views[:, 2:4].transpose(0, 1).is_contiguous()
    assert views[:, 3].is_contiguous()


def test_make_views_generator_reproducible_and_checks():
    batch = make_batch()
    p1 = make_views(batch, "cpu", n_series=4, generator=torch.Generator().manual_seed(7))[1]
    p2 = make_views(batch, "cpu", n_series=4, generator=torch.Generator().manual_seed(7))[1]
    assert torch.equal(p1, p2)
    with pytest.raises(ValueError, match="n_series must be a positive integer dividing the 8 frames"):
        make_views(batch, "cpu", n_series=3, generator=None)
    with pytest.raises(ValueError, match=r"batch\['video'\] must be a uint8 tensor \(B, 3, T, H, W, C\)"):
        make_views({**batch, "video": batch["video"][:, :2]}, "cpu", n_series=2, generator=None)
    with pytest.raises(ValueError, match=r"batch\['video'\] must be a uint8"):
        make_views({**batch, "video": batch["video"].float()}, "cpu", n_series=2, generator=None)
    flipped = {**batch, "hflip": batch["hflip"].clone()}
    flipped["hflip"][1, 0] = True
    with pytest.raises(ValueError, match="hflip"):
        make_views(flipped, "cpu", n_series=2, generator=None)


# ------------------------------------------------------------------------------------ frameworks
def fixed_views(B=4, s=2, seed=0):
    views, perm = make_views(make_batch(B=B, seed=seed), "cpu", n_series=s,
                             generator=torch.Generator().manual_seed(seed), derangement=True)
    return views, perm


def _framework(name, mode, **kw):
    torch.manual_seed(0)
    return build_framework(name, build_backbone("tiny"), mode=mode, clip_dim=16, n_series=2, series_dim=8, **kw)


def _record_batches(framework):
    """Batch size of every backbone call, per backbone attribute name."""
    seen = {}
    for attr in ("backbone", "key_backbone"):
        mod = getattr(framework, attr, None)
        if mod is not None:
            mod.register_forward_pre_hook(lambda m, a, attr=attr: seen.setdefault(attr, []).append(a[0].shape[0]))
    return seen


@pytest.mark.parametrize("name", ["simclr", "moco"])
@pytest.mark.parametrize("mode", MODES)
def test_forward_shapes_and_batchnorm_batches(name, mode):
    views, perm = fixed_views()
    fw = _framework(name, mode)
    seen = _record_batches(fw)
    emb = fw(views, perm)
    assert isinstance(emb, Embeddings)
    assert emb.z0.shape == emb.z1.shape == (4, 16)
    torch.testing.assert_close(emb.z0.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(emb.z1.norm(dim=1), torch.ones(4))
    if mode == "baseline":
        assert emb.u0 is emb.u1 is emb.u2 is emb.y_shuf is emb.perm is None
    else:
        for u in (emb.u0, emb.u1, emb.u2):
            assert u.shape == (4, 2, 8)
            torch.testing.assert_close(u.norm(dim=-1), torch.ones(4, 2))
        assert emb.y_shuf.shape == (4, 2, 8) and not torch.allclose(emb.y_shuf.norm(dim=-1), torch.ones(4, 2))
        assert emb.perm is perm
    # docs/method.md §8.8: SimCLR {v0, v1, v2} (3B) + shuffled (B); baseline {v0, v1}; MoCo v0 (B), key v1 (B),
    # {v2, shuffled} (2B)
    expect = {("simclr", True): {"backbone": [12, 4]}, ("simclr", False): {"backbone": [8]},
              ("moco", True): {"backbone": [4, 8], "key_backbone": [4]},
              ("moco", False): {"backbone": [4], "key_backbone": [4]}}[(name, mode != "baseline")]
    assert seen == expect
    if name == "moco":
        assert not emb.z1.requires_grad and (emb.u1 is None or not emb.u1.requires_grad)


def test_simclr_views_match_per_view_backbone_calls():
    """The 3B batch is view-major: row v*B + b is view v of sample b (eval mode: no batch statistics)."""
    views, perm = fixed_views()
    fw = _framework("simclr", "clip-sr-tc").eval()
    with torch.no_grad():
        emb = fw(views, perm)
        for v, u in enumerate((emb.u0, emb.u1, emb.u2)):
            torch.testing.assert_close(u, fw.series_head(fw.backbone(views[:, v])), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(emb.z1, fw.clip_head(fw.backbone(views[:, 1])), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(emb.y_shuf, fw.series_head(fw.backbone(views[:, 3]), normalize=False),
                                   rtol=1e-5, atol=1e-6)


def test_moco_key_encoder_moves_by_ema_and_gets_no_gradient():
    views, perm = fixed_views()
    fw = _framework("moco", "clip-sr-tc", momentum=0.9)
    assert isinstance(fw, MoCo)
    q_params = fw._query_params()
    k_params = fw._key_params()
    assert len(q_params) == len(k_params) and all(not p.requires_grad for p in k_params)
    assert all(torch.equal(q, k) for q, k in zip(q_params, k_params))  # starts as a copy
    opt = torch.optim.SGD([p for p in fw.parameters() if p.requires_grad], lr=0.5)
    obj = build_objective(DualVarLossConfig(framework="moco"), queue_size=16, clip_dim=16, series_dim=8)
    obj(fw(views, perm)).total.backward()
    assert all(p.grad is None for p in k_params)
    assert all(p.grad is not None for p in fw.series_head.parameters())
    opt.step()
    k_before = [p.detach().double().clone() for p in k_params]
    q_now = [p.detach().double().clone() for p in q_params]
    assert any(not torch.equal(k, q) for k, q in zip(k_before, q_now))
    fw(views, perm)  # training: EMA first
    for k, k0, q in zip(k_params, k_before, q_now):
        torch.testing.assert_close(k.double(), 0.9 * k0 + 0.1 * q, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(q.double(), q1) for q, q1 in zip(q_params, q_now))  # query untouched by forward
    k_after = [p.detach().clone() for p in k_params]
    fw.eval()
    fw(views, perm)  # evaluation: no EMA
    assert all(torch.equal(k, k1) for k, k1 in zip(k_params, k_after))


def test_moco_keys_are_computed_after_the_ema_update():
    """With momentum 0 the EMA makes the key encoder the query encoder; done before the keys, z1 is the
    query encoder's clip embedding of view 1 (same batch of B, so the same BatchNorm statistics)."""
    views, perm = fixed_views()
    fw = _framework("moco", "clip-sr", momentum=0.0)
    with torch.no_grad():
        for p in fw.clip_head.parameters():
            p.add_(0.5)  # the query now differs from its key copy
    emb = fw(views, perm)
    with torch.no_grad():
        torch.testing.assert_close(emb.z1, fw.clip_head(fw.backbone(views[:, 1])), rtol=1e-5, atol=1e-6)


def test_moco_key_shuffle_hook():
    views, perm = fixed_views()
    fw = _framework("moco", "clip-sr-tc")
    plain = fw(views, perm)
    calls = []

    def reverse(x):
        calls.append(x.shape[0])
        return x.flip(0), lambda h: h.flip(0)

    fw2 = _framework("moco", "clip-sr-tc")
    fw2.key_shuffle = reverse
    shuffled = fw2(views, perm)
    assert calls == [4]
    torch.testing.assert_close(shuffled.z1, plain.z1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shuffled.u1, plain.u1, rtol=1e-4, atol=1e-5)


def test_framework_argument_checks():
    views, perm = fixed_views()
    with pytest.raises(ValueError, match="framework name must be one of"):
        build_framework("byol", build_backbone("tiny"), mode="baseline")
    with pytest.raises(ValueError, match="mode must be one of"):
        SimCLR(build_backbone("tiny"), mode="avg")
    with pytest.raises(ValueError, match="momentum"):
        MoCo(build_backbone("tiny"), mode="baseline", momentum=1.5)
    fw = _framework("simclr", "clip-sr")
    with pytest.raises(ValueError, match=r"views must be \(B, 4, C, T, H, W\)"):
        fw(views[:, :3], perm)
    with pytest.raises(ValueError, match=r"perm must be int64 \(4, 2\)"):
        fw(views, perm[:, :1])
    assert _framework("simclr", "avg-series").mode == "clip-sr-tc"


# ---------------------------------------------------------------------------------- optimisation
@pytest.mark.parametrize("name", ["simclr", "moco"])
@pytest.mark.parametrize("mode", MODES)
def test_sgd_steps_lower_the_loss(name, mode):
    """The training step as the trainer runs it (views -> framework -> objective -> backward -> step ->
    update) on one fixed batch lowers the loss. MoCo's is measured against the initial queues: the steps
    enqueue this batch's own keys, which as negatives would raise the loss of this same batch."""
    views, perm = fixed_views(B=8)
    fw = _framework(name, mode, **({"momentum": 0.99} if name == "moco" else {}))
    obj = build_objective(DualVarLossConfig(framework=name, mode=mode), queue_size=64, clip_dim=16, series_dim=8,
                          generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD([p for p in fw.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    queues = copy.deepcopy(obj.state_dict())
    losses = []
    for _ in range(8):
        emb = fw(views, perm)
        out = obj(emb)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        obj.update(emb)
        losses.append(float(out.total.detach()))
    if name == "moco":
        assert int(obj.clip_queue.ptr) == 0  # 8 steps x 8 keys went through the queue of 64
    obj.load_state_dict(queues)
    with torch.no_grad():
        final = float(obj(fw(views, perm)).total)
    assert all(np.isfinite(losses + [final]))
    assert final < 0.9 * losses[0], (losses, final)


@pytest.mark.parametrize("name", ["simclr", "moco"])
def test_step_under_bf16_autocast(name):
    """bf16 autocast around the framework: every embedding is float32 and the objective (float32 queues)
    runs and back-propagates."""
    views, perm = fixed_views()
    fw = _framework(name, "clip-sr-tc")
    obj = build_objective(DualVarLossConfig(framework=name), queue_size=16, clip_dim=16, series_dim=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = fw(views.to(torch.bfloat16), perm)
    assert all(getattr(emb, f).dtype == torch.float32 for f in ("z0", "z1", "u0", "u1", "u2", "y_shuf"))
    out = obj(emb)
    out.total.backward()
    assert torch.isfinite(out.total) and fw.backbone.layer1[0].conv1[0].weight.grad is not None
