"""The DualVar objective vs a float64 transcription of the reference computation (docs/method.md §3.1-3.5):
the masked-logits NT-Xent with a 2N x 2N label matrix and the 4-D avg-series similarity tensor; the
shuffle-rank terms through the op's oracle `shuffle_rank_loss_reference`; losses and every embedding gradient."""
import math

import pytest
import torch
import torch.nn.functional as F

import dualvar.kernels as K
from helpers import cpu_backends, needs_gpu
from dualvar.engine.frameworks import Embeddings
from dualvar.engine.objectives import DualVarLoss, DualVarLossConfig, MoCoDualVarLoss, Queue, build_objective


# ------------------------------------------------------------------ float64 reference transcription
def ref_nt_xent(features, N, temperature):
    """SimCLR reference: labels matrix of the 2N rows, self mask, positives/negatives by boolean
    indexing, logits [pos, negs] / T, cross-entropy with target 0."""
    labels = torch.cat([torch.arange(N) for _ in range(2)])
    labels = (labels.unsqueeze(0) == labels.unsqueeze(1)).float()
    sim = features
    mask = torch.eye(labels.shape[0], dtype=torch.bool)
    labels = labels[~mask].view(labels.shape[0], -1)
    sim = sim[~mask].view(sim.shape[0], -1)
    positives = sim[labels.bool()].view(labels.shape[0], -1)
    negatives = sim[~labels.bool()].view(sim.shape[0], -1)
    logits = torch.cat([positives, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))


def ref_rank(A, y_shuf, perm, theta, cap, w):
    """The shuffle-rank term through the op's one oracle (calibration, Gram matrix, capped softplus)."""
    return K.shuffle_rank_loss_reference(A, y_shuf, perm, theta, cap=cap, weight=w)


def ref_simclr(z0, z1, u0, u1, u2, y_shuf, perm, mode, tau, tau_a, theta, cap):
    N = z0.shape[0]
    f = torch.cat([z0, z1])
    out = {"clip_nce": ref_nt_xent(f @ f.t(), N, tau)}
    if mode == "clip-sr-tc":
        U = torch.cat([u0, u1])  # (2N, s, d)
        sim4 = torch.matmul(U.unsqueeze(1), U.unsqueeze(0).transpose(-1, -2))  # (2N, 2N, s, s)
        out["tc_nce"] = ref_nt_xent(sim4.mean(dim=(-1, -2)), N, tau_a)
    if mode != "baseline":
        out["sr_rank_view0"] = ref_rank(u0, y_shuf, perm, theta, cap, 0.5)
        out["sr_rank_view2"] = ref_rank(u2, y_shuf, perm, theta, cap, 0.5)
    return out


def ref_moco(z_q, z_k, u_q, u_k, u2, y_shuf, perm, clip_queue, series_queue_full, mode, tau, tau_a, theta, cap):
    """series_queue_full: (K, s, d) per-chunk unit entries, as the reference stores them."""
    logits = torch.cat([(z_q * z_k).sum(1, keepdim=True), z_q @ clip_queue.t()], 1) / tau
    out = {"clip_nce": F.cross_entropy(logits, torch.zeros(len(z_q), dtype=torch.long))}
    if mode == "clip-sr-tc":
        pos = torch.matmul(u_q, u_k.transpose(1, 2)).mean(dim=(1, 2)).unsqueeze(1)
        neg = torch.matmul(u_q.unsqueeze(1), series_queue_full.unsqueeze(0).transpose(-1, -2))  # (B, K, s, s)
        logits = torch.cat([pos, neg.mean(dim=(-1, -2))], 1) / tau_a
        out["tc_nce"] = F.cross_entropy(logits, torch.zeros(len(u_q), dtype=torch.long))
    if mode != "baseline":
        out["sr_rank_view0"] = ref_rank(u_q, y_shuf, perm, theta, cap, 0.5)
        out["sr_rank_view2"] = ref_rank(u2, y_shuf, perm, theta, cap, 0.5)
    return out


# ------------------------------------------------------------------ inputs
def unit(*shape, gen):
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def simclr_inputs(B, s, d, D, gen):
    z0, z1 = unit(B, D, gen=gen), unit(B, D, gen=gen)
    u0, u1, u2 = (unit(B, s, d, gen=gen) for _ in range(3))
    y = torch.randn(B, s, d, generator=gen, dtype=torch.float64) * 2
    perm = torch.rand(B, s, generator=gen).argsort(1)
    return dict(z0=z0, z1=z1, u0=u0, u1=u1, u2=u2, y_shuf=y, perm=perm)


def with_grad(inputs):
    return {k: (v.clone().requires_grad_(True) if v.dtype.is_floating_point else v) for k, v in inputs.items()}


def record(inputs):
    """The Embeddings record of named inputs (MoCo's query/key names map to views 0/1)."""
    names = dict(z_q="z0", z_k="z1", u_q="u0", u_k="u1")
    return Embeddings(**{names.get(k, k): v for k, v in inputs.items()})


def assert_parts_and_grads(out, ref, ours_in, ref_in, names, rtol=1e-9, atol=1e-10):
    for name, value in ref.items():
        torch.testing.assert_close(getattr(out, name).double(), value, rtol=rtol, atol=atol, msg=name)
    total_ref = sum(ref.values())
    torch.testing.assert_close(out.total.double(), total_ref, rtol=rtol, atol=atol)
    g_ours = torch.autograd.grad(out.total, [ours_in[n] for n in names], allow_unused=True)
    g_ref = torch.autograd.grad(total_ref, [ref_in[n] for n in names], allow_unused=True)
    for n, go, gr in zip(names, g_ours, g_ref):
        if gr is None:
            assert go is None or float(go.abs().max()) == 0, n
            continue
        assert go is not None, n
        torch.testing.assert_close(go.double(), gr, rtol=rtol, atol=atol, msg=n)


# theta 0.05 on random vectors: many scaled differences exceed the cap of 5 (cap active);
# theta 1.0: |x| <= 2 < 5 (cap inactive); and the MoCo reference's uncapped form.
CAPS = [(0.05, 5.0, True), (1.0, 5.0, False)]


def _cap_is_active(inputs, theta, cap, anchor="u0"):
    inv = inputs["perm"].argsort(1).unsqueeze(-1).expand_as(inputs["y_shuf"])
    P = F.normalize(inputs["y_shuf"], dim=-1).gather(1, inv)  # calibrated: P[b, perm[b, j]] = y[b, j]
    X = torch.cat([inputs[anchor], P], 1)
    S = X @ X.transpose(1, 2)
    return bool(((S.max() - S.min()) / theta) > cap)


@pytest.mark.parametrize("mode", ["baseline", "clip-sr", "clip-sr-tc"])
@pytest.mark.parametrize("s", [2, 3])
@pytest.mark.parametrize("theta,cap,active", CAPS)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_simclr_objective_equals_reference(mode, s, theta, cap, active, backend, gen):
    inputs = simclr_inputs(6, s, 8, 16, gen)
    if active:  # make sure some terms sit at the cap (constructed: an anchor equals a negative)
        inputs["u0"][0, 0] = inputs["u0"][0, 1]
    assert _cap_is_active(inputs, theta, cap) == active
    ours_in, ref_in = with_grad(inputs), with_grad(inputs)
    cfg = DualVarLossConfig(mode=mode, framework="simclr", tau=0.07, tau_a=0.1, theta=theta, cap=cap, backend=backend)
    out = DualVarLoss(cfg)(record(ours_in))
    ref = ref_simclr(**ref_in, mode=mode, tau=0.07, tau_a=0.1, theta=theta, cap=cap)
    assert_parts_and_grads(out, ref, ours_in, ref_in, ["z0", "z1", "u0", "u1", "u2", "y_shuf"])
    if mode == "baseline":
        assert out.tc_nce is None and out.sr_rank_view0 is None
    if mode != "baseline":
        assert 0 <= float(out.sr_accuracy) <= 1
        assert set(out.parts()) >= {"total", "clip_nce", "sr_rank_view0", "sr_rank_view2", "sr_accuracy"}


def moco_setup(B, s, d, D, K, gen):
    inputs = simclr_inputs(B, s, d, D, gen)
    inputs = dict(z_q=inputs["z0"], z_k=inputs["z1"], u_q=inputs["u0"], u_k=inputs["u1"], u2=inputs["u2"],
                  y_shuf=inputs["y_shuf"], perm=inputs["perm"])
    clip_q = unit(K, D, gen=gen)
    series_full = unit(K, s, d, gen=gen)
    return inputs, clip_q, series_full


@pytest.mark.parametrize("mode", ["baseline", "clip-sr", "clip-sr-tc"])
@pytest.mark.parametrize("s", [2, 3])
@pytest.mark.parametrize("theta,cap,active", CAPS + [(0.05, math.inf, False)])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_moco_objective_equals_reference(mode, s, theta, cap, active, backend, gen):
    inputs, clip_q, series_full = moco_setup(4, s, 8, 16, 12, gen)
    if active:
        inputs["u_q"][0, 0] = inputs["u_q"][0, 1]
        assert _cap_is_active(inputs, theta, cap, "u_q")
    ours_in, ref_in = with_grad(inputs), with_grad(inputs)
    cfg = DualVarLossConfig(mode=mode, framework="moco", tau=0.07, tau_a=0.1, theta=theta, cap=cap, backend=backend)
    loss = MoCoDualVarLoss(cfg, Queue(clip_q), Queue(series_full.mean(dim=1)))
    out = loss(record(ours_in))
    ref = ref_moco(ref_in["z_q"], ref_in["z_k"].detach(), ref_in["u_q"], ref_in["u_k"].detach(), ref_in["u2"],
                   ref_in["y_shuf"], ref_in["perm"], clip_q, series_full, mode, 0.07, 0.1, theta, cap)
    assert_parts_and_grads(out, ref, ours_in, ref_in, ["z_q", "z_k", "u_q", "u_k", "u2", "y_shuf"])


def test_moco_default_cap_is_uncapped_reference():
    assert DualVarLossConfig(framework="moco").cap == math.inf
    assert DualVarLossConfig(framework="simclr").cap == 5.0
    assert DualVarLossConfig(mode="avg-series").mode == "clip-sr-tc"
    assert DualVarLossConfig(mode="only-seg").mode == "clip-sr"


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "torch"])
def test_objective_on_fused_backends_float32(backend, gen):
    """The objective through the fused kernels (float32) matches the float64 reference."""
    inputs = simclr_inputs(5, 2, 16, 8, gen)
    ours_in = {k: (v.float().requires_grad_(True) if v.dtype.is_floating_point else v) for k, v in inputs.items()}
    ref_in = with_grad(inputs)
    out = DualVarLoss(DualVarLossConfig(backend=backend))(record(ours_in))
    ref = ref_simclr(**ref_in, mode="clip-sr-tc", tau=0.07, tau_a=0.07, theta=0.05, cap=5.0)
    assert_parts_and_grads(out, ref, ours_in, ref_in, ["z0", "z1", "u0", "u1", "u2", "y_shuf"], rtol=1e-4, atol=1e-5)


def test_queue_enqueue_per_entry_and_out_of_place(gen):
    q = Queue.random_unit(8, 3, generator=gen)
    assert torch.allclose(q.entries.norm(dim=1), torch.ones(8, dtype=q.entries.dtype))
    old = q.entries
    keys = torch.randn(4, 3, generator=gen)
    q.enqueue(keys)
    assert torch.equal(q.entries[:4], keys) and torch.equal(q.entries[4:], old[4:]) and int(q.ptr) == 4
    q.enqueue(keys * 2)
    assert torch.equal(q.entries[4:], keys * 2) and int(q.ptr) == 0
    assert not torch.equal(old[:4], q.entries[:4])  # old tensor untouched (autograd-safe)
    with pytest.raises(ValueError, match="divisible"):
        q.enqueue(torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"keys must be \(n, 3\)"):
        q.enqueue(torch.randn(4, 5))
    assert set(q.state_dict()) == {"entries", "ptr"}
    sq = Queue.random_series_means(4, 2, 5, generator=gen)
    assert sq.entries.shape == (4, 5) and bool((sq.entries.norm(dim=1) <= 1 + 1e-6).all())


def test_moco_enqueue_stores_key_means_and_backward_after_enqueue(gen):
    inputs, clip_q, series_full = moco_setup(4, 2, 8, 16, 8, gen)
    ours_in = with_grad(inputs)
    loss = MoCoDualVarLoss(DualVarLossConfig(framework="moco", backend="torch"), Queue(clip_q),
                           Queue(series_full.mean(1)))
    out = loss(record(ours_in))
    loss.update(record(inputs))
    torch.testing.assert_close(loss.clip_queue.entries[:4], inputs["z_k"])
    torch.testing.assert_close(loss.series_queue.entries[:4], inputs["u_k"].mean(1))
    out.total.backward()  # the queue update did not invalidate the graph
    assert ours_in["z_q"].grad is not None and ours_in["z_k"].grad is None
    # the tc logits against the stored means equal those against the full per-chunk entries
    m_q = inputs["u_q"].mean(1)
    full = torch.matmul(inputs["u_q"].unsqueeze(1), series_full.unsqueeze(0).transpose(-1, -2)).mean(dim=(-1, -2))
    torch.testing.assert_close(m_q @ series_full.mean(1).t(), full)


def test_config_validation():
    with pytest.raises(ValueError, match="mode must be"):
        DualVarLossConfig(mode="avg")
    with pytest.raises(ValueError, match="framework"):
        DualVarLossConfig(framework="byol")
    with pytest.raises(ValueError, match="tau"):
        DualVarLossConfig(tau=0)
    with pytest.raises(ValueError, match="sr_weights"):
        DualVarLossConfig(sr_weights=(0.5,))
    with pytest.raises(ValueError, match="reference_ddp"):
        DualVarLossConfig(reference_ddp=True)
    with pytest.raises(ValueError, match="MoCoDualVarLoss"):
        DualVarLoss(DualVarLossConfig(framework="moco"))
    with pytest.raises(ValueError, match="u2 is required"):
        g = torch.Generator().manual_seed(0)
        x = simclr_inputs(2, 2, 4, 4, g)
        DualVarLoss(DualVarLossConfig(mode="clip-sr"))(record({**x, "u2": None}))
    with pytest.raises(TypeError, match="Embeddings record"):
        DualVarLoss(DualVarLossConfig())(x)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("framework", ["simclr", "moco"])
def test_objective_on_gpu(framework, gen):
    """The whole objective on CUDA tensors (default backends) vs the float64 reference on the CPU."""
    inputs, clip_q, series_full = moco_setup(8, 2, 16, 8, 16, gen)
    cuda_in = {k: (v.float().cuda().requires_grad_(True) if v.dtype.is_floating_point else v.cuda())
               for k, v in inputs.items()}
    ref_in = with_grad(inputs)
    cfg = DualVarLossConfig(framework=framework)
    if framework == "moco":
        loss = MoCoDualVarLoss(cfg, Queue(clip_q.float().cuda()), Queue(series_full.mean(1).float().cuda()))
        out = loss(record(cuda_in))
        ref = ref_moco(ref_in["z_q"], ref_in["z_k"].detach(), ref_in["u_q"], ref_in["u_k"].detach(), ref_in["u2"],
                       ref_in["y_shuf"], ref_in["perm"], clip_q, series_full, "clip-sr-tc", 0.07, 0.07, 0.05, cfg.cap)
        names = ["z_q", "u_q", "u2", "y_shuf"]
    else:
        ren = dict(z_q="z0", z_k="z1", u_q="u0", u_k="u1")
        cuda_in = {ren.get(k, k): v for k, v in cuda_in.items()}
        ref_in = {ren.get(k, k): v for k, v in ref_in.items()}
        out = DualVarLoss(cfg)(record(cuda_in))
        ref = ref_simclr(**ref_in, mode="clip-sr-tc", tau=0.07, tau_a=0.07, theta=0.05, cap=5.0)
        names = ["z0", "z1", "u0", "u1", "u2", "y_shuf"]
    for name, value in ref.items():
        torch.testing.assert_close(getattr(out, name).detach().double().cpu(), value.detach(), rtol=1e-4, atol=1e-5)
    g_ours = torch.autograd.grad(out.total, [cuda_in[n] for n in names])
    g_ref = torch.autograd.grad(sum(ref.values()), [ref_in[n] for n in names])
    for go, gr in zip(g_ours, g_ref):
        torch.testing.assert_close(go.double().cpu(), gr, rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------ distributed (2 CPU processes, gloo)
def _dist_worker(rank, world, port, inputs, mode, out_dir):
    import os
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        B = inputs["z0"].shape[0] // world
        local = {k: v[rank * B:(rank + 1) * B].clone() for k, v in inputs.items()}
        local = with_grad(local)
        cfg = DualVarLossConfig(mode=mode, distributed=True, backend="cpu")
        out = DualVarLoss(cfg)(record(local))
        out.total.backward()
        # MoCo: every rank enqueues every rank's keys, in rank order
        moco = build_objective(DualVarLossConfig(mode=mode, framework="moco", distributed=True, backend="cpu"),
                               queue_size=4 * B * world, clip_dim=local["z1"].shape[1],
                               series_dim=local["u1"].shape[2], generator=torch.Generator().manual_seed(rank))
        moco.update(record(local))
        torch.save({"parts": {k: v.detach() for k, v in out.parts().items()},
                    "grads": {k: v.grad for k, v in local.items() if v.dtype.is_floating_point},
                    "queues": moco.state_dict()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_reproduce_single_process_gradient(tmp_path, gen):
    """docs/method.md §4(a): with DDP's averaging, W ranks give the single-process global-batch gradient,
    i.e. (1/W) * (rank r's embedding gradient) = dL_global/d(rank r's embeddings); losses average.
    MoCo's update enqueues the keys of every rank on every rank."""
    import socket
    import torch.multiprocessing as mp
    inputs = simclr_inputs(6, 2, 8, 16, gen)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    W = 2
    mp.spawn(_dist_worker, args=(W, port, inputs, "clip-sr-tc", str(tmp_path)), nprocs=W, join=True)
    ours_in = with_grad(inputs)
    single = DualVarLoss(DualVarLossConfig(backend="cpu"))(record(ours_in))
    single.total.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(W)]
    for name in ("total", "clip_nce", "tc_nce", "sr_rank_view0", "sr_rank_view2"):
        mean = sum(r["parts"][name] for r in ranks) / W
        torch.testing.assert_close(mean, getattr(single, name).detach(), rtol=1e-10, atol=1e-12, msg=name)
    B = 3
    for name in ("z0", "z1", "u0", "u1", "u2", "y_shuf"):
        for r in range(W):
            torch.testing.assert_close(ranks[r]["grads"][name] / W, ours_in[name].grad[r * B:(r + 1) * B],
                                       rtol=1e-9, atol=1e-12, msg=f"{name} rank {r}")
    for r in range(W):
        q = ranks[r]["queues"]
        torch.testing.assert_close(q["clip_queue.entries"][:W * B], inputs["z1"].float(), msg=f"rank {r}")
        torch.testing.assert_close(q["series_queue.entries"][:W * B], inputs["u1"].mean(1).float(), msg=f"rank {r}")
        assert int(q["clip_queue.ptr"]) == int(q["series_queue.ptr"]) == W * B


# ------------------------------------------------------------------ record API: build_objective, update, NaN
def test_build_objective_and_update(gen):
    simclr = build_objective(DualVarLossConfig(framework="simclr"))
    assert isinstance(simclr, DualVarLoss) and simclr.update(record(simclr_inputs(2, 2, 4, 8, gen))) is None
    cfg = DualVarLossConfig(framework="moco", backend="torch")
    loss = build_objective(cfg, queue_size=8, clip_dim=16, series_dim=8, n_series=3, generator=gen)
    assert isinstance(loss, MoCoDualVarLoss)
    assert loss.clip_queue.entries.shape == (8, 16) and loss.series_queue.entries.shape == (8, 8)
    torch.testing.assert_close(loss.clip_queue.entries.norm(dim=1), torch.ones(8))
    # the series queue holds means of 3 unit chunks: norms below 1, not unit
    assert bool((loss.series_queue.entries.norm(dim=1) < 1 - 1e-3).all())
    assert set(loss.state_dict()) == {"clip_queue.entries", "clip_queue.ptr", "series_queue.entries",
                                      "series_queue.ptr"}
    inputs, _, _ = moco_setup(4, 3, 8, 16, 8, gen)
    inputs = {k: (v.float() if v.is_floating_point() else v) for k, v in inputs.items()}
    loss.update(record(inputs))
    torch.testing.assert_close(loss.clip_queue.entries[:4], inputs["z_k"])
    torch.testing.assert_close(loss.series_queue.entries[:4], inputs["u_k"].mean(1))
    assert int(loss.clip_queue.ptr) == 4 and int(loss.series_queue.ptr) == 4
    # a baseline record carries no series: only the clip queue moves
    loss.update(Embeddings(z0=inputs["z_q"], z1=inputs["z_k"]))
    assert int(loss.clip_queue.ptr) == 0 and int(loss.series_queue.ptr) == 4
    with pytest.raises(ValueError, match="queue_size"):
        build_objective(cfg, queue_size=0)


@pytest.mark.parametrize("framework", ["simclr", "moco"])
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("field", ["z0", "z1", "u0", "u1", "u2", "y_shuf"])
def test_nan_in_one_embedding_gives_nan_total(framework, field, backend, gen):
    """NaN in -> NaN out: one NaN in any embedding the mode uses makes its part and the total NaN
    (MoCo: the key's NaN reaches clip_nce and tc_nce), never an exception or a silently finite total."""
    inputs, clip_q, series_full = moco_setup(4, 2, 8, 16, 8, gen)
    names = dict(z_q="z0", z_k="z1", u_q="u0", u_k="u1")
    inputs = {names.get(k, k): v for k, v in inputs.items()}
    inputs[field] = inputs[field].clone()
    inputs[field][1, 0] = float("nan")
    cfg = DualVarLossConfig(framework=framework, backend=backend)
    loss = (DualVarLoss(cfg) if framework == "simclr"
            else MoCoDualVarLoss(cfg, Queue(clip_q), Queue(series_full.mean(1))))
    out = loss(record(inputs))
    assert torch.isnan(out.total), out.parts()
    part = {"z0": "clip_nce", "z1": "clip_nce", "u1": "tc_nce", "u2": "sr_rank_view2", "y_shuf": "sr_rank_view0",
            "u0": "sr_rank_view0"}[field]
    assert torch.isnan(getattr(out, part)), (part, out.parts())
