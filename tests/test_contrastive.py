"""Fused contrastive losses (op "contrastive"): the references against literal loops, every backend that
runs here against the float64 references (forward and gradients, odd shapes, every variant, any
strides), numerics, bad input on every backend, no double backward, memory, ahead-of-time
compilation, GPU checks."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dualvar.kernels as K
from dualvar.kernels import _aot, contrastive_triton
from dualvar.kernels import contrastive as C
from dualvar.kernels._dispatch import OpImpl
from dualvar.kernels._ext import load_ext
from helpers import cpu_backends, needs_gpu, needs_two_gpus

BACKENDS = cpu_backends()
load_ext()  # torch.ops.dualvar.* exist once the extension is loaded (tests below call them directly)


def unit(*shape, gen, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1).to(dtype)


def grads_of(fn, *xs):
    xs = [x.detach().clone().requires_grad_(r) for x, r in xs]
    loss = fn(*xs)
    loss.backward()
    return loss.detach(), [x.grad for x in xs]


def tol(dtype):
    return {torch.float64: 1e-9, torch.float32: 2e-5}[dtype]


def close(a, b, dtype, scale=1.0):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol(dtype) * max(1.0, scale), f"max error {err:.3g}"


# ------------------------------------------------------------- the references against literal loops
def nt_xent_loop(z, tau, n_views):
    """docs/method.md §3.1 term by term: log of the sum over the other rows minus the mean positive."""
    M = z.shape[0]
    N = M // n_views
    total = 0.0
    for a in range(M):
        denom = sum(math.exp(float(z[a] @ z[b]) / tau) for b in range(M) if b != a)
        pos = [b for b in range(M) if b != a and b % N == a % N]
        total += math.log(denom) - sum(float(z[a] @ z[p]) / tau for p in pos) / len(pos)
    return total / M


def info_nce_loop(q, k, queue, tau):
    total = 0.0
    for i in range(q.shape[0]):
        pos = float(q[i] @ k[i]) / tau
        negs = [float(q[i] @ c) / tau for c in queue] if queue is not None else \
            [float(q[i] @ k[j]) / tau for j in range(k.shape[0]) if j != i]
        total += math.log(math.exp(pos) + sum(math.exp(n) for n in negs)) - pos
    return total / q.shape[0]


@pytest.mark.parametrize("n_views,N,D", [(2, 5, 7), (3, 4, 3), (2, 1, 4)])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_nt_xent_reference_matches_loop(n_views, N, D, tau, gen):
    z = unit(n_views * N, D, gen=gen)
    assert K.nt_xent_loss_reference(z, tau, n_views=n_views).item() == pytest.approx(nt_xent_loop(z, tau, n_views),
                                                                                      rel=1e-10)


@pytest.mark.parametrize("with_queue", [False, True])
def test_info_nce_reference_matches_loop(with_queue, gen):
    q, k = unit(6, 5, gen=gen), unit(6, 5, gen=gen)
    queue = unit(9, 5, gen=gen) if with_queue else None
    assert K.info_nce_loss_reference(q, k, queue, 0.1).item() == pytest.approx(info_nce_loop(q, k, queue, 0.1),
                                                                               rel=1e-10)


def test_reference_gradients(gen):
    """The references are plain autograd; gradcheck guards their formulas' differentiability (no in-place
    masking that would break the graph)."""
    z = unit(6, 4, gen=gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: K.nt_xent_loss_reference(x, 0.3, n_views=3), (z,))
    q, k = (unit(4, 3, gen=gen).requires_grad_() for _ in range(2))
    queue = unit(5, 3, gen=gen)  # the queue never receives a gradient
    assert torch.autograd.gradcheck(lambda a, b: K.info_nce_loss_reference(a, b, queue, 0.2), (q, k))


# ------------------------------------------------------------------- every backend vs the reference
# Shapes: (n_views, N, D). N = 1, odd row counts, D not a power of two, D > one Triton chunk.
NT_SHAPES = [(2, 1, 8), (2, 5, 7), (3, 4, 16), (2, 37, 33), (2, 70, 130)]


# float64 runs on the torch and cpu backends (the GPU kernels refuse it: test_triton_refuses_...).
BACKEND_DTYPES = [(b, d) for b in BACKENDS for d in (torch.float32, torch.float64)
                  if (b, d) != ("triton", torch.float64)]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("n_views,N,D", NT_SHAPES)
def test_nt_xent_matches_reference(backend, n_views, N, D, dtype, gen):
    z = unit(n_views * N, D, gen=gen)
    ref, (gref,) = grads_of(lambda x: K.nt_xent_loss_reference(x, 0.1, n_views=n_views), (z, True))
    out, (g,) = grads_of(lambda x: K.nt_xent_loss(x, 0.1, n_views=n_views, backend=backend), (z.to(dtype), True))
    assert K.last_backend("contrastive") == backend
    close(out, ref, dtype, abs(ref.item()))
    close(g, gref, dtype, gref.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["non_unit", "identical_rows", "low_temperature"])
def test_nt_xent_numerics(backend, case, gen):
    if case == "non_unit":
        z, tau = torch.randn(40, 24, generator=gen, dtype=torch.float64) * 3, 0.1
    elif case == "identical_rows":
        z, tau = unit(1, 16, gen=gen).repeat(30, 1), 0.1
    else:
        z, tau = unit(48, 20, gen=gen), 0.01
    ref, (gref,) = grads_of(lambda x: K.nt_xent_loss_reference(x, tau), (z, True))
    out, (g,) = grads_of(lambda x: K.nt_xent_loss(x, tau, backend=backend), (z.float(), True))
    assert torch.isfinite(out) and torch.isfinite(g).all()
    scale = gref.abs().max().item()
    assert abs(out.item() - ref.item()) <= 1e-4 * max(1, abs(ref.item()))
    assert (g.double() - gref).abs().max().item() <= 1e-4 * max(1.0, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_queue,k_grad", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("B,D,Kq", [(1, 8, 5), (9, 33, 70), (64, 128, 200)])
def test_info_nce_matches_reference(backend, with_queue, k_grad, B, D, Kq, gen):
    q, k = unit(B, D, gen=gen), unit(B, D, gen=gen)
    queue = unit(Kq, D, gen=gen) if with_queue else None
    ref, (gq_ref, gk_ref) = grads_of(lambda a, b: K.info_nce_loss_reference(a, b, queue, 0.07), (q, True), (k, True))
    qf = queue.float().requires_grad_() if with_queue else None
    out, (gq, gk) = grads_of(lambda a, b: K.info_nce_loss(a, b, qf, 0.07, backend=backend),
                             (q.float(), True), (k.float(), k_grad))
    assert K.last_backend("contrastive") == backend
    close(out, ref, torch.float32, abs(ref.item()))
    close(gq, gq_ref, torch.float32, gq_ref.abs().max().item())
    if k_grad:
        close(gk, gk_ref, torch.float32, gk_ref.abs().max().item())
    else:
        assert gk is None
    if with_queue:
        assert qf.grad is None  # the queue never receives a gradient


def test_temporal_coherent_loss_is_nt_xent_on_mean_series(gen):
    """docs/method.md §3.2: the reference builds the (2B, 2N, s, s) tensor of all series similarities and
    averages it; the fused path runs nt_xent_loss on the mean series vectors (not re-normalised)."""
    N, s, d, tau = 6, 3, 10, 0.07
    u = unit(2 * N, s, d, gen=gen).requires_grad_()  # view-major: rows v*N + i
    sims = torch.einsum("akd,bld->abkl", u, u)  # (2N, 2N, s, s), the reference's 4-D tensor
    logits = sims.mean(dim=(2, 3)) / tau
    mask = torch.eye(2 * N, dtype=torch.bool)
    labels = torch.cat([torch.arange(N, 2 * N), torch.arange(N)])
    masked = logits.masked_fill(mask, float("-inf"))
    ref = F.cross_entropy(masked, labels)
    ref.backward()
    gref = u.grad.clone()
    u.grad = None
    for backend in BACKENDS:
        u2 = u.detach().float().requires_grad_()
        out = K.nt_xent_loss(u2.mean(dim=1), tau, backend=backend)
        out.backward()
        assert abs(out.item() - ref.item()) < 1e-5
        assert (u2.grad.double() - gref).abs().max().item() < 1e-5


def test_gradcheck_cpu_backend_float64(gen):
    z = unit(10, 6, gen=gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: K.nt_xent_loss(x, 0.2, backend="cpu"), (z,))
    z3 = unit(9, 5, gen=gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: K.nt_xent_loss(x, 0.3, n_views=3, backend="cpu"), (z3,))
    q, k = unit(5, 4, gen=gen).requires_grad_(), unit(5, 4, gen=gen).requires_grad_()
    queue = unit(7, 4, gen=gen)
    assert torch.autograd.gradcheck(lambda a, b: K.info_nce_loss(a, b, None, 0.2, backend="cpu"), (q, k))
    assert torch.autograd.gradcheck(lambda a, b: K.info_nce_loss(a, b, queue, 0.2, backend="cpu"), (q, k))
    r, c = unit(6, 4, gen=gen).requires_grad_(), unit(11, 4, gen=gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: K.masked_lse(a, b, 0.5, 3, backend="cpu").sum(), (r, c))


# Under the interpreter tl.dot on bf16 is wrong (triton#11584): triton bf16 is checked on a GPU.
HALF_CASES = [(b, d) for b in BACKENDS for d in (torch.bfloat16, torch.float16) if (b, d) != ("triton", torch.bfloat16)]


@pytest.mark.parametrize("backend,dtype", HALF_CASES)
def test_half_precision_error_within_twice_plain_torch(backend, dtype, gen):
    """flash-attention's rule: error against float64 at most twice plain torch's in the same dtype."""
    z = unit(96, 64, gen=gen)
    ref, (gref,) = grads_of(lambda x: K.nt_xent_loss_reference(x, 0.05), (z, True))
    plain, (gplain,) = grads_of(lambda x: K.nt_xent_loss_reference(x, 0.05), (z.to(dtype), True))
    out, (g,) = grads_of(lambda x: K.nt_xent_loss(x, 0.05, backend=backend), (z.to(dtype), True))
    assert abs(out.item() - ref.item()) <= 2 * abs(plain.item() - ref.item()) + 1e-6
    assert (g.double() - gref).abs().max() <= 2 * (gplain.double() - gref).abs().max() + 1e-6


# The triton kernels run under the interpreter here and for real on a GPU machine.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if "triton" in BACKENDS else None)


@pytest.mark.gpu  # runs here under the interpreter, and on hardware in make gpu-check
@pytest.mark.skipif(TRITON_DEVICE is None, reason="needs a GPU")
@pytest.mark.parametrize("weight", [1e-5, 1e6])
def test_triton_fp16_backward_neither_underflows_nor_overflows(weight, gen):
    """float16 inputs: the backward casts H = g p / tau to float16 for its H @ z product. A small
    loss weight puts H among float16's subnormals, a loss-scaled gradient (GradScaler) past 65504;
    the gradient must keep float16-input accuracy either way (float64 on the same rounded inputs)."""
    M, tau = 256, 0.07
    z16 = unit(M, 32, gen=gen, dtype=torch.float16).to(TRITON_DEVICE)
    g = torch.full((M,), weight / M, dtype=torch.float32, device=TRITON_DEVICE)
    lse = contrastive_triton.forward(z16, z16, tau, 0)
    out = contrastive_triton.backward_sym(z16, tau, lse, g)
    z64 = z16.double().cpu().requires_grad_()
    s = (z64 @ z64.T / tau).masked_fill(torch.eye(M, dtype=torch.bool), float("-inf"))
    (dz,) = torch.autograd.grad(torch.logsumexp(s, 1), z64, g.double().cpu())
    assert torch.isfinite(out).all(), "float16 H overflowed"
    err = ((out.double().cpu() - dz).abs().max() / dz.abs().max()).item()
    assert err < 1e-3, f"relative gradient error {err:.3g}"  # 2e-4 measured; 0.14 unscaled at 1e-5


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension is not built")
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_symmetric_tiles_over_many_blocks(threads, gen):
    """The CPU forward multiplies each tile pair of SimCLR's symmetric matrix once (512-row tiles) and
    merges per-thread row statistics; check it across several tiles with a ragged last tile, against
    the float64 reference and against the row-block path (k a different tensor: no symmetry used)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        z = torch.randn(1302, 19, generator=gen, dtype=torch.float64)  # non-unit rows, 3 tiles, last ragged
        sym = torch.ops.dualvar.contrastive_fwd(z, z, 0.2, 0)
        rows = torch.ops.dualvar.contrastive_fwd(z, z.clone(), 0.2, 0)
        s = z @ z.t() / 0.2
        s.fill_diagonal_(float("-inf"))
        ref = torch.logsumexp(s, dim=1)
        assert (sym - ref).abs().max() < 1e-10 and (rows - ref).abs().max() < 1e-10
        ref_loss, (gref,) = grads_of(lambda x: K.nt_xent_loss_reference(x, 0.2), (z, True))
        out, (g,) = grads_of(lambda x: K.nt_xent_loss(x, 0.2, backend="cpu"), (z, True))
        close(out, ref_loss, torch.float64)
        close(g, gref, torch.float64)
        z[1000, 3] = float("nan")  # a row of the third tile: its lse and the loss must be NaN, not dropped
        lse = torch.ops.dualvar.contrastive_fwd(z, z, 0.2, 0)
        assert torch.isnan(lse).all()  # every row sees the NaN column
        assert torch.isnan(torch.ops.dualvar.contrastive_fwd(z, z.clone(), 0.2, 0)).all()  # row-block path too
        assert torch.isnan(K.nt_xent_loss(z, 0.2, check_finite=False, backend="cpu"))
    finally:
        torch.set_num_threads(old)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension is not built")
@pytest.mark.parametrize("tau", [0.05, 0.01])
def test_cpu_float32_tiles_narrow_and_wide_logit_ranges(tau, gen):
    """float32 rows whose norms spread over 0.05..3: some tile pairs span at most 80 in scaled logits
    (one exponential serves the row and the column) and others span more (per-row/per-column path);
    loss and gradient against the float64 reference on the same float32 values."""
    scale = torch.linspace(0.05, 3.0, 1302, dtype=torch.float64)[torch.randperm(1302, generator=gen)]
    z64 = torch.nn.functional.normalize(torch.randn(1302, 19, generator=gen, dtype=torch.float64), dim=1)
    z32 = (z64 * scale[:, None]).float()
    ref_loss, (gref,) = grads_of(lambda x: K.nt_xent_loss_reference(x, tau), (z32.double(), True))
    out, (g,) = grads_of(lambda x: K.nt_xent_loss(x, tau, backend="cpu"), (z32, True))
    assert abs(float(out) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert (g.double() - gref).abs().max() <= 1e-5 * gref.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_input_raises_or_propagates(backend, gen):
    z = unit(8, 4, gen=gen).float()
    z[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        K.nt_xent_loss(z, backend=backend)
    assert torch.isnan(K.nt_xent_loss(z, check_finite=False, backend=backend))
    q = unit(4, 4, gen=gen).float()
    queue = unit(6, 4, gen=gen).float()
    queue[0, 0] = float("inf")
    with pytest.raises(ValueError, match="queue holds NaN"):
        K.info_nce_loss(q, q, queue, backend=backend)


def _bad_cases():
    z = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    nan = z.clone()
    nan[2, 1] = float("nan")
    inf_queue = torch.randn(5, 4)
    inf_queue[1, 0] = float("inf")
    nt, nce = K.nt_xent_loss, K.info_nce_loss
    tau_grad = torch.tensor(0.1, requires_grad=True)
    return [
        # (id, function, args, kwargs, exception, message)
        ("z_3d", nt, (z[None],), {}, ValueError, "z must be a 2-D tensor"),
        ("z_list", nt, (z.tolist(),), {}, ValueError, "z must be a 2-D tensor"),
        ("z_int", nt, (torch.ones(6, 4, dtype=torch.int64),), {}, TypeError, "z must be a floating tensor"),
        ("z_no_rows", nt, (z[:0],), {}, ValueError, "z must be non-empty"),
        ("z_no_dim", nt, (z[:, :0],), {}, ValueError, "z must be non-empty"),
        ("z_nan", nt, (nan,), {}, ValueError, "z holds NaN or Inf"),
        ("tau_zero", nt, (z,), dict(temperature=0.0), ValueError, "temperature must be a positive finite number"),
        ("tau_negative", nt, (z,), dict(temperature=-0.1), ValueError, "temperature must be a positive"),
        ("tau_inf", nt, (z,), dict(temperature=math.inf), ValueError, "temperature must be a positive"),
        ("tau_nan", nt, (z,), dict(temperature=math.nan), ValueError, "temperature must be a positive"),
        ("tau_str", nt, (z,), dict(temperature="0.1"), TypeError, "temperature must be a positive finite number"),
        ("tau_none", nt, (z,), dict(temperature=None), TypeError, "temperature must be a positive finite number"),
        ("tau_bool", nt, (z,), dict(temperature=True), TypeError, "temperature must be a positive finite number"),
        ("tau_vector", nt, (z,), dict(temperature=torch.tensor([0.1, 0.2])), TypeError, "temperature must be"),
        ("tau_requires_grad", nt, (z,), dict(temperature=tau_grad), ValueError,
         "temperature is a tensor that requires grad"),
        ("n_views_none", nt, (z,), dict(n_views=None), TypeError, "n_views must be an int"),
        ("n_views_float", nt, (z,), dict(n_views=2.0), TypeError, "n_views must be an int"),
        ("n_views_bool", nt, (z,), dict(n_views=True), TypeError, "n_views must be an int"),
        ("n_views_one", nt, (z,), dict(n_views=1), ValueError, "n_views=1"),
        ("n_views_not_divisor", nt, (z,), dict(n_views=4), ValueError, "z has 6 rows, which is not n_views=4"),
        ("distributed_str", nt, (z,), dict(distributed="yes"), TypeError, "distributed must be True or False"),
        ("check_finite_none", nt, (z,), dict(check_finite=None), TypeError, "check_finite must be True or False"),
        ("nt_backend_unknown", nt, (z,), dict(backend="tpu"), K.BackendUnavailable, "unknown backend 'tpu'"),
        ("q_1d", nce, (z[0], z[0]), {}, ValueError, "q must be a 2-D tensor"),
        ("k_rows", nce, (z, z[:3]), {}, ValueError, r"q \(6, 4\) and k \(3, 4\) must have the same shape"),
        ("k_dim", nce, (z, z[:, :3]), {}, ValueError, "k has dim 3 but q has dim 4"),
        ("k_dtype", nce, (z, z.double()), {}, TypeError, "k is torch.float64 but q is torch.float32"),
        ("k_nan", nce, (z, nan), {}, ValueError, "k holds NaN or Inf"),
        ("queue_dim", nce, (z, z, torch.randn(5, 3)), {}, ValueError, "queue has dim 3 but q has dim 4"),
        ("queue_dtype", nce, (z, z, torch.randn(5, 4).half()), {}, TypeError, "queue is torch.float16 but q is"),
        ("queue_1d", nce, (z, z, torch.randn(4)), {}, ValueError, "queue must be a 2-D tensor"),
        ("queue_empty", nce, (z, z, torch.randn(0, 4)), {}, ValueError, "queue must be non-empty"),
        ("queue_inf", nce, (z, z, inf_queue), {}, ValueError, "queue holds NaN or Inf"),
        ("nce_tau_requires_grad", nce, (z, z), dict(temperature=tau_grad), ValueError,
         "temperature is a tensor that requires grad"),
        ("nce_tau_zero", nce, (z, z), dict(temperature=0), ValueError, "temperature must be a positive"),
        ("lse_offset_float", K.masked_lse, (z, z, 0.1, 1.0), {}, TypeError, "exclude_offset must be an int or None"),
        ("lse_k_dim", K.masked_lse, (z, z[:, :3], 0.1), {}, ValueError, "k has dim 3 but q has dim 4"),
    ]


BAD_IDS = [c[0] for c in _bad_cases()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_inputs_name_the_problem(backend, case, monkeypatch):
    """Every malformed argument: an exception naming it and what was expected, the same from every
    backend, before any kernel runs (the backend's kernels are replaced by ones that fail the test)."""
    _, fn, args, kwargs, exc, msg = next(c for c in _bad_cases() if c[0] == case)

    def kernel(*a):
        raise AssertionError("a kernel ran on malformed input")
    monkeypatch.setitem(C._IMPLS, backend, OpImpl(kernel, kernel))
    with pytest.raises(exc, match=msg):
        fn(*args, **{"backend": backend, **kwargs})


def test_compiled_op_checks_inputs_itself():
    """The C++ op validates too (callers of torch.ops.dualvar.* skip the Python checks)."""
    with pytest.raises(RuntimeError, match="same dim"):
        torch.ops.dualvar.contrastive_fwd(torch.randn(6, 4), torch.randn(3, 5), 0.1, None)


def test_temperature_as_a_tensor_without_grad(gen):
    z = unit(8, 5, gen=gen).float()
    assert K.nt_xent_loss(z, torch.tensor(0.2), backend="torch") == K.nt_xent_loss(z, 0.2, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused(backend, gen):
    """The fused backward is differentiable once: a gradient of a gradient raises (on every backend alike)
    instead of returning a wrong Hessian-vector product; the first-order gradient with create_graph
    stays exact."""
    z = unit(8, 5, gen=gen).float().requires_grad_()
    q, k = unit(4, 5, gen=gen).float().requires_grad_(), unit(4, 5, gen=gen).float().requires_grad_()
    queue = unit(6, 5, gen=gen).float()
    for loss, inputs, ref in (
            (lambda: K.nt_xent_loss(z, 0.1, backend=backend), (z,), lambda: K.nt_xent_loss_reference(z, 0.1)),
            (lambda: K.info_nce_loss(q, k, None, 0.1, backend=backend), (q, k),
             lambda: K.info_nce_loss_reference(q, k, None, 0.1)),
            (lambda: K.info_nce_loss(q, k, queue, 0.1, backend=backend), (q, k),
             lambda: K.info_nce_loss_reference(q, k, queue, 0.1))):
        grads = torch.autograd.grad(loss(), inputs, create_graph=True)
        for g, g_ref in zip(grads, torch.autograd.grad(ref(), inputs)):
            close(g, g_ref, torch.float32, g_ref.abs().max().item())
        with pytest.raises(RuntimeError, match=r"contrastive \(nt_xent_loss, info_nce_loss\): cannot differentiate"):
            torch.autograd.grad(sum(g.square().sum() for g in grads), inputs)


def strided_cases(gen, device="cpu", dtype=torch.float32):
    """(name, base, view): NT-Xent input view(base) with row slices, column slices, a transpose, a column
    offset (unaligned start) and rows repeated by a stride-0 expand."""
    u = lambda *shape: unit(*shape, gen=gen).to(device=device, dtype=dtype)
    yield "rows_sliced", u(24, 9), lambda x: x[::2]
    yield "columns_sliced", u(12, 18), lambda x: x[:, ::2]
    yield "transposed", u(9, 12), lambda x: x.t()
    yield "column_offset", u(12, 11), lambda x: x[:, 2:]
    yield "expanded", u(1, 9), lambda x: x.expand(12, 9)


def strided_equal_contiguous(loss, cases, dtype=torch.float32):
    """loss(*views) and its gradients in every base equal those of the contiguous copies of the views."""
    bases = [base.detach().clone().requires_grad_() for _, base, _ in cases]
    views = [view(b) for b, (_, _, view) in zip(bases, cases)]
    assert not all(v.is_contiguous() for v in views)
    out = loss(*views)
    grads = torch.autograd.grad(out, bases, allow_unused=True)  # (a queue gets no gradient)
    bases_c = [base.detach().clone().requires_grad_() for _, base, _ in cases]
    ref = loss(*[view(b).contiguous() for b, (_, _, view) in zip(bases_c, cases)])
    grads_ref = torch.autograd.grad(ref, bases_c, allow_unused=True)
    close(out.cpu(), ref.cpu(), dtype, abs(ref.item()))
    for g, g_ref in zip(grads, grads_ref):
        assert (g is None) == (g_ref is None)
        if g is not None:
            close(g.cpu(), g_ref.cpu(), dtype, g_ref.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_equal_contiguous(backend, gen):
    """Non-contiguous, sliced, transposed and expanded inputs: the loss and gradient of the contiguous copy."""
    for case in strided_cases(gen):
        strided_equal_contiguous(lambda z: K.nt_xent_loss(z, 0.1, backend=backend), [case])
        assert K.last_backend("contrastive") == backend
    cases = {name: (name, base, view) for name, base, view in strided_cases(gen)}
    strided_equal_contiguous(lambda q, k, queue: K.info_nce_loss(q, k, queue, 0.1, backend=backend),
                             [cases["transposed"], cases["rows_sliced"], cases["columns_sliced"]])
    strided_equal_contiguous(lambda q, k: K.info_nce_loss(q, k, None, 0.1, backend=backend),
                             [cases["column_offset"], cases["expanded"]])


def test_stale_extension_is_reported_by_name(monkeypatch, gen):
    """An extension built from older sources (an op missing): the cpu backend says so and how to rebuild;
    auto falls back to torch with that reason in its warning."""
    from dualvar.kernels import _dispatch
    monkeypatch.setattr(C, "COMPILED_OPS", C.COMPILED_OPS + ("contrastive_from_the_future",))
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    z = unit(6, 4, gen=gen).float()
    with pytest.raises(K.BackendUnavailable, match=r"stale: it lacks torch.ops.dualvar.contrastive_from_the_future"
                                                   r".*pip install --no-build-isolation -e \."):
        K.nt_xent_loss(z, backend="cpu")
    with pytest.warns(RuntimeWarning, match="falls back to the torch backend.*stale"):
        K.nt_xent_loss(z)
    assert K.last_backend("contrastive") == "torch"


def test_triton_refuses_what_it_cannot_run(gen):
    z = unit(6, 4, gen=gen)
    with pytest.raises(K.BackendUnavailable, match="float64|CUDA tensors"):
        K.nt_xent_loss(z, backend="triton")
    with pytest.raises(ValueError, match="1..1024"):
        contrastive_triton.block_config("fwd", 2048, torch.bfloat16)


def test_chunked_torch_fallback_never_builds_full_matrix(gen, monkeypatch):
    """The fallback's tiles stay within its budget, so it works where rows x columns would not fit."""
    from dualvar.kernels import contrastive
    monkeypatch.setattr(contrastive, "_chunk_rows", lambda n_cols, budget=1 << 24: 7)
    z = unit(40, 8, gen=gen)
    ref, (gref,) = grads_of(lambda x: K.nt_xent_loss_reference(x, 0.2), (z, True))
    out, (g,) = grads_of(lambda x: K.nt_xent_loss(x, 0.2, backend="torch"), (z, True))
    close(out, ref, torch.float64)
    close(g, gref, torch.float64)


# the benchmark's probe: one step in a fresh process, growth of its own peak RSS after a warm-up
MEMORY_PROBE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                            "contrastive_memory.py")


def peak_extra_mb(M, D, backend):
    out = subprocess.run([sys.executable, MEMORY_PROBE, backend, str(M), str(D), "cpu", "float32"],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS is read from /proc (Linux)")
def test_cpu_backend_memory_is_linear_in_rows():
    """Peak extra RSS, in a fresh process: a 16k x 16k fp32 matrix alone would be 1 GiB."""
    # the probe sees a quadratic allocation: the plain reference at 4096 rows holds 64 MB matrices
    assert peak_extra_mb(4096, 128, "reference") > 100
    small, large = peak_extra_mb(4096, 128, "cpu"), peak_extra_mb(16384, 128, "cpu")
    assert 8 < large < 120, f"{large:.0f} MB extra at M = 16384 (the gradient alone is 8 MB)"
    assert large < 4 * small + 40, (small, large)  # linear (4x rows) up to fixed tile buffers


# ---------------------------------------------------------------- ahead-of-time compilation
# The launchers themselves on the shapes of real calls (M = 4096 rows), so every kernel compiles with the
# runtime's specialisation: 16-byte aligned pointers and strides divisible by 16 get divisibility hints,
# which change the code (vector loads, deeper pipelining: up to twice the shared memory of a hint-less build).
M_AOT = 4096
AOT_CASES = [(call, D, t, arch) for call in ("nt_xent", "info_nce") for D in (64, 128, 256, 1024)
             for t in ("bfloat16", "float16", "float32") for arch in (80, 90) if call == "nt_xent" or D == 128]
FWD, BWD = "_contrastive_fwd_kernel", "_contrastive_bwd_kernel"
LAUNCHES = {"nt_xent": [FWD, BWD],  # forward; one-pass symmetric backward
            "info_nce": [FWD, BWD, BWD]}  # forward; dq; dk


def _aot_specs(call, D, t, arch):
    x = {"zeros": [M_AOT, D], "dtype": t}
    vec = {"zeros": [M_AOT], "dtype": "float32"}
    mod = "dualvar.kernels.contrastive_triton"
    if call == "nt_xent":  # q is k (argument 1 is argument 0): self excluded at offset 0
        return [{"launcher": f"{mod}:forward", "args": [x, {"same_as": 0}, 0.07, 0], "arch": arch},
                {"launcher": f"{mod}:backward", "args": [x, {"same_as": 0}, 0.07, 0, vec, vec, True, True],
                 "arch": arch}]
    return [{"launcher": f"{mod}:forward", "args": [x, x, 0.07, None], "arch": arch},
            {"launcher": f"{mod}:backward", "args": [x, x, 0.07, None, vec, vec, True, True], "arch": arch}]


@pytest.fixture(scope="module")
def aot_reports():
    specs = [_aot_specs(*c) for c in AOT_CASES]
    flat = _aot.compile_launchers([s for pair in specs for s in pair])
    return {c: flat[2 * i] + flat[2 * i + 1] for i, c in enumerate(AOT_CASES)}


@pytest.mark.slow
@pytest.mark.parametrize("call,D,t,arch", AOT_CASES)
def test_triton_kernels_compile_within_limits(aot_reports, call, D, t, arch):
    reports = aot_reports[(call, D, t, arch)]
    assert [r.name for r in reports] == LAUNCHES[call]
    for rep in reports:
        assert rep.arch == arch and rep.hints > 0, rep
        assert rep.within_limits(), rep
        if D <= 128:  # the main configurations: no register spills
            assert rep.spill_stores == 0 and rep.spill_loads == 0, rep


# ---------------------------------------------------------------------------- GPU checks
@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,D", [(2, 8), (1000, 128), (4098, 64), (514, 200)])
def test_gpu_nt_xent_matches_reference(backend, dtype, M, D, gen):
    z = unit(M, D, gen=gen)
    ref, (gref,) = grads_of(lambda x: K.nt_xent_loss_reference(x, 0.07), (z, True))
    plain, (gplain,) = grads_of(lambda x: K.nt_xent_loss_reference(x, 0.07), (z.to(dtype).cuda(), True))
    out, (g,) = grads_of(lambda x: K.nt_xent_loss(x, 0.07, backend=backend), (z.to(dtype).cuda(), True))
    assert K.last_backend("contrastive") == backend
    if dtype == torch.float32:
        assert abs(out.item() - ref.item()) < 1e-4 and (g.double().cpu() - gref).abs().max() < 1e-4
    else:
        assert abs(out.item() - ref.item()) <= 2 * abs(plain.item() - ref.item()) + 1e-5
        assert (g.double().cpu() - gref).abs().max() <= 2 * (gplain.double().cpu() - gref).abs().max() + 1e-5


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_queue", [True, False])
def test_gpu_info_nce_16_bit_error_within_twice_plain_torch(backend, dtype, with_queue, gen):
    """MoCo in bf16/fp16 (queue in the same dtype): loss and gradients of q and k within twice plain
    torch's error in that dtype, against float64."""
    q, k = unit(77, 128, gen=gen), unit(77, 128, gen=gen)
    queue = unit(1000, 128, gen=gen) if with_queue else None
    ref, (gq_ref, gk_ref) = grads_of(lambda a, b: K.info_nce_loss_reference(a, b, queue, 0.07), (q, True), (k, True))
    low = lambda x: None if x is None else x.to(dtype).cuda()
    plain, (gq_plain, gk_plain) = grads_of(lambda a, b: K.info_nce_loss_reference(a, b, low(queue), 0.07),
                                           (low(q), True), (low(k), True))
    out, (gq, gk) = grads_of(lambda a, b: K.info_nce_loss(a, b, low(queue), 0.07, backend=backend),
                             (low(q), True), (low(k), True))
    assert K.last_backend("contrastive") == backend
    assert out.dtype == torch.float32 and gq.dtype == dtype
    err = lambda a, b: (a.double().cpu() - b).abs().max().item()
    assert abs(out.item() - ref.item()) <= 2 * abs(plain.item() - ref.item()) + 1e-6
    assert err(gq, gq_ref) <= 2 * err(gq_plain, gq_ref) + 1e-6
    assert err(gk, gk_ref) <= 2 * err(gk_plain, gk_ref) + 1e-6


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_strided_inputs_equal_contiguous(backend, gen):
    for case in strided_cases(gen, "cuda"):
        strided_equal_contiguous(lambda z: K.nt_xent_loss(z, 0.1, backend=backend), [case])
        assert K.last_backend("contrastive") == backend
    for dtype in (torch.bfloat16, torch.float16):
        for case in strided_cases(gen, "cuda", dtype):
            strided_equal_contiguous(lambda z: K.nt_xent_loss(z, 0.1, backend=backend), [case], torch.float32)
    cases = {name: (name, base, view) for name, base, view in strided_cases(gen, "cuda")}
    strided_equal_contiguous(lambda q, k, queue: K.info_nce_loss(q, k, queue, 0.1, backend=backend),
                             [cases["transposed"], cases["rows_sliced"], cases["columns_sliced"]])
    strided_equal_contiguous(lambda q, k: K.info_nce_loss(q, k, None, 0.1, backend=backend),
                             [cases["column_offset"], cases["expanded"]])


@needs_two_gpus
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_tensors_off_the_current_device(backend, gen):
    """Inputs on cuda:1 while cuda:0 is current: forward and backward launch on cuda:1 (a device guard)."""
    z = unit(300, 64, gen=gen)
    ref, (gref,) = grads_of(lambda x: K.nt_xent_loss_reference(x, 0.1), (z, True))
    q, k, queue = unit(40, 64, gen=gen), unit(40, 64, gen=gen), unit(200, 64, gen=gen)
    ref2, (gq_ref, gk_ref) = grads_of(lambda a, b: K.info_nce_loss_reference(a, b, queue, 0.1), (q, True), (k, True))
    with torch.cuda.device(0):
        out, (g,) = grads_of(lambda x: K.nt_xent_loss(x, 0.1, backend=backend), (z.float().to("cuda:1"), True))
        out2, (gq, gk) = grads_of(lambda a, b: K.info_nce_loss(a, b, queue.float().to("cuda:1"), 0.1, backend=backend),
                                  (q.float().to("cuda:1"), True), (k.float().to("cuda:1"), True))
    assert g.device == torch.device("cuda:1")
    for o, r in ((out, ref), (out2, ref2)):
        assert abs(o.item() - r.item()) < 1e-4
    for a, b in ((g, gref), (gq, gq_ref), (gk, gk_ref)):
        assert (a.double().cpu() - b).abs().max() < 1e-4


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("with_queue", [True, False])
def test_gpu_info_nce_matches_reference(backend, with_queue, gen):
    q, k = unit(77, 128, gen=gen), unit(77, 128, gen=gen)
    queue = unit(1000, 128, gen=gen) if with_queue else None
    ref, (gq_ref, gk_ref) = grads_of(lambda a, b: K.info_nce_loss_reference(a, b, queue, 0.07), (q, True), (k, True))
    qc = queue.float().cuda() if with_queue else None
    out, (gq, gk) = grads_of(lambda a, b: K.info_nce_loss(a, b, qc, 0.07, backend=backend),
                             (q.float().cuda(), True), (k.float().cuda(), True))
    assert K.last_backend("contrastive") == backend
    assert abs(out.item() - ref.item()) < 1e-4
    assert (gq.double().cpu() - gq_ref).abs().max() < 1e-4 and (gk.double().cpu() - gk_ref).abs().max() < 1e-4


def test_compiled_ops_pass_opcheck(gen):
    """Schema, fake (meta) functions and dispatcher registration agree (torch.library.opcheck)."""
    q, k = unit(9, 5, gen=gen).float(), unit(13, 5, gen=gen).float()
    lse = torch.ops.dualvar.contrastive_fwd(q, k, 0.2, 2)
    grad = torch.rand(9, generator=gen)
    torch.library.opcheck(torch.ops.dualvar.contrastive_fwd.default, (q, k, 0.2, 2))
    torch.library.opcheck(torch.ops.dualvar.contrastive_bwd.default, (q, k, lse, grad, 0.2, 2, True, True))
    z = unit(12, 5, gen=gen).float()
    zl = torch.ops.dualvar.contrastive_fwd(z, z, 0.2, 0)
    torch.library.opcheck(torch.ops.dualvar.contrastive_bwd_sym.default, (z, zl, torch.rand(12, generator=gen), 0.2))
