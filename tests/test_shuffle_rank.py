"""shuffle_rank_loss: the reference against the one literal loop transcription of the formula; every
backend (forward, accuracy, gradients of anchor, anchor2 and shuffled) against the reference in float64:
odd shapes, caps, gradcheck, 16-bit error, malformed input, NaN/inf, overflowing norms, strided inputs,
double backward, determinism, opcheck, ahead-of-time compilation. GPU variants run under `-m gpu`."""
import math

import pytest
import torch
import torch.nn.functional as F

import dualvar.kernels as K
from dualvar.kernels import _aot
from dualvar.kernels import shuffle_rank as SR
from dualvar.kernels._dispatch import OpImpl
from dualvar.kernels._ext import compiled_op_reason
from helpers import cpu_backends, needs_gpu, needs_two_gpus

INF = math.inf
GPU = [needs_gpu, pytest.mark.gpu]
# (device, backend): every backend that can run here, then the GPU ones (run by `pytest -m gpu`)
CPU_CASES = [pytest.param("cpu", b, id=b) for b in cpu_backends()]
EVERY = CPU_CASES + [pytest.param("cuda", b, id=f"cuda-{b}", marks=GPU) for b in ("torch", "triton", "cuda")]


# ------------------------------------------------------------------------------------ helpers
def literal(anchor, shuffled, perm, theta, cap, weight=1.0):
    """Loop-by-loop transcription of docs/method.md §3.3 in Python floats, with the reference code's
    scatter calibration (out[b, perm[b, j]] = normalize(y[b, j])) and log1p(exp(min(x, cap))).
    Returns (R, accuracy). The only transcription of the formula: it tests the reference, and every
    other test compares against the reference."""
    B, s, _ = anchor.shape
    total, n, correct = 0.0, 0, 0
    for b in range(B):
        p = [None] * s
        for j in range(s):
            p[int(perm[b, j])] = shuffled[b, j] / max(float(shuffled[b, j].norm()), 1e-12)
        X = [anchor[b, i] for i in range(s)] + p
        for i in range(2 * s):
            c = i + s if i < s else i - s
            pos = float(X[i] @ X[c])
            best = True
            for j in range(2 * s):
                if j in (i, c):
                    continue
                sim = float(X[i] @ X[j])
                total += math.log1p(math.exp(min((sim - pos) / theta, cap)))
                n += 1
                best = best and sim <= pos
            correct += best
    return weight * total / n, correct / (B * 2 * s)


def make(B, s, d, gen, dtype=torch.float64, scale_y=1.0):
    a = F.normalize(torch.randn(B, s, d, generator=gen, dtype=torch.float64), dim=-1)
    a2 = F.normalize(torch.randn(B, s, d, generator=gen, dtype=torch.float64), dim=-1)
    y = torch.randn(B, s, d, generator=gen, dtype=torch.float64) * scale_y
    perm = torch.rand(B, s, generator=gen).argsort(dim=1)
    return a.to(dtype), a2.to(dtype), y.to(dtype), perm


def reference(a, a2, y, perm, theta, cap, w=(0.5, 0.7), upstream=(1.0, 0.5)):
    """The float64 reference on (a, a2, y) as given (already rounded to the tested dtype): terms (2,),
    accuracy (2,), gradients of (a, a2, y) for the loss upstream . terms."""
    xs = [t.detach().cpu().double().requires_grad_(True) for t in (a, a2, y)]
    perm = perm.cpu()
    terms = torch.stack([SR.shuffle_rank_loss_reference(xs[k], xs[2], perm, theta, cap=cap, weight=w[k])
                         for k in (0, 1)])
    grads = torch.autograd.grad((terms * torch.tensor(upstream, dtype=torch.float64)).sum(), xs)
    acc = torch.stack([SR.shuffle_rank_accuracy_reference(xs[k].detach(), xs[2].detach(), perm) for k in (0, 1)])
    return terms.detach(), acc, grads


def run(backend, a, a2, y, perm, theta, cap, dtype, device="cpu", w=(0.5, 0.7), upstream=(1.0, 0.5), **kw):
    """The public op on leaves of (a, a2, y) in dtype on device: (result, gradients) for upstream . terms."""
    xs = [t.detach().to(device=device, dtype=dtype).requires_grad_(True) for t in (a, a2, y)]
    res = K.shuffle_rank_loss(xs[0], xs[2], perm.to(device), theta, cap=cap, weight=w[0], anchor2=xs[1],
                              weight2=w[1], return_parts=True, backend=backend, **kw)
    assert K.last_backend("shuffle_rank") == backend
    (res.terms * torch.tensor(upstream, dtype=res.terms.dtype, device=device)).sum().backward()
    return res, [t.grad for t in xs]


def exact_dtype(device, backend):
    """The most precise dtype a backend takes: float64 on the CPU backends, float32 on the GPU ones."""
    return torch.float64 if device == "cpu" and backend != "triton" else torch.float32


TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def assert_matches(res, grads, ref, tol, dtype):
    terms, acc, grads_ref = ref
    torch.testing.assert_close(res.terms.detach().cpu().double(), terms, rtol=tol, atol=tol)
    torch.testing.assert_close(res.loss.detach().cpu().double(), terms.sum(), rtol=tol, atol=tol)
    torch.testing.assert_close(res.accuracy.cpu().double(), acc, rtol=0, atol=1e-6)
    for g, gr in zip(grads, grads_ref):
        assert g.dtype == dtype
        torch.testing.assert_close(g.cpu().double(), gr, rtol=tol, atol=tol * max(1.0, float(gr.abs().max())))


# ------------------------------------------------------------------------ the reference itself
@pytest.mark.parametrize("s", [2, 3])
@pytest.mark.parametrize("theta,cap", [(0.05, 5.0), (0.05, INF), (0.01, 5.0), (0.7, 5.0)])
def test_reference_matches_literal_loops(s, theta, cap, gen):
    a, _, y, perm = make(4, s, 6, gen, scale_y=3.0)
    r, acc = literal(a, y, perm, theta, cap, weight=0.5)
    assert SR.shuffle_rank_loss_reference(a, y, perm, theta, cap=cap, weight=0.5).item() == pytest.approx(r, rel=1e-10)
    assert SR.shuffle_rank_accuracy_reference(a, y, perm).item() == pytest.approx(acc, abs=1e-12)


def test_reference_gradients(gen):
    a, _, y, perm = make(3, 3, 5, gen)
    xs = (a.requires_grad_(), y.requires_grad_())
    assert torch.autograd.gradcheck(lambda a_, y_: SR.shuffle_rank_loss_reference(a_, y_, perm, 0.5, cap=5.0), xs)


# ------------------------------------------------------------------------ backends vs reference
SHAPES = [(1, 2, 7), (3, 3, 64), (17, 2, 130), (4, 5, 1), (2, 8, 33), (5, 2, 512), (3, 6, 150)]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("B,s,d", SHAPES)
@pytest.mark.parametrize("theta,cap", [(0.05, 5.0), (0.05, INF), (0.9, 5.0), (0.05, 0.3)])
def test_backends_equal_reference(backend, B, s, d, theta, cap, gen):
    if backend == "triton" and B * s * d > 6000:
        B = 2  # the interpreter is slow; shapes stay odd
    a, a2, y, perm = make(B, s, d, gen, scale_y=3.0)
    dtype = exact_dtype("cpu", backend)
    res, grads = run(backend, a, a2, y, perm, theta, cap, dtype)
    assert_matches(res, grads, reference(a, a2, y, perm, theta, cap), TOL[dtype], dtype)


@pytest.mark.parametrize("backend", cpu_backends())
def test_single_anchor_and_scalar_return(backend, gen):
    a, _, y, perm = make(3, 2, 9, gen)
    xs = [a.float().requires_grad_(True), y.float().requires_grad_(True)]
    out = K.shuffle_rank_loss(xs[0], xs[1], perm, 0.05, cap=5.0, weight=0.3, backend=backend)
    assert out.dim() == 0
    out.backward()
    refs = [a.clone().requires_grad_(True), y.clone().requires_grad_(True)]
    ref = SR.shuffle_rank_loss_reference(refs[0], refs[1], perm, 0.05, cap=5.0, weight=0.3)
    ref.backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    for x, r in zip(xs, refs):
        torch.testing.assert_close(x.grad.double(), r.grad, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("device,backend", EVERY)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_at_most_twice_torch(device, backend, dtype, gen):
    """flash-attention's rule: a low-precision kernel's error against the float64 reference is at most
    twice that of the plain torch reference computing in the same dtype (plus 1e-6 for exact cases)."""
    a, a2, y, perm = make(17, 2, 64, gen, scale_y=2.0)
    terms64, _, grads64 = reference(a, a2, y, perm, 0.05, 5.0, w=(0.5, 0.5), upstream=(1.0, 1.0))
    naive = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (a, a2, y)]
    r = (SR.shuffle_rank_loss_reference(naive[0], naive[2], perm.to(device), 0.05, weight=0.5)
         + SR.shuffle_rank_loss_reference(naive[1], naive[2], perm.to(device), 0.05, weight=0.5))
    r.backward()
    res, grads = run(backend, a, a2, y, perm, 0.05, 5.0, dtype, device, w=(0.5, 0.5), upstream=(1.0, 1.0))
    err = lambda x, ref: float((x.detach().cpu().double() - ref).abs().max())
    assert err(res.loss, terms64.sum()) <= 2 * err(r, terms64.sum()) + 1e-6
    for name, g, n, gr in zip(("anchor", "anchor2", "shuffled"), grads, naive, grads64):
        assert g.dtype == dtype
        assert err(g, gr) <= 2 * err(n.grad, gr) + 1e-6, name


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
def test_gradcheck_float64(backend, gen):
    a, a2, y, perm = make(3, 3, 5, gen, scale_y=2.0)
    xs = [t.clone().requires_grad_(True) for t in (a, a2, y)]

    def f(a_, a2_, y_):
        return K.shuffle_rank_loss(a_, y_, perm, 0.5, cap=5.0, weight=0.5, anchor2=a2_, weight2=0.7,
                                   return_parts=True, backend=backend).terms

    assert torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-8)
    assert K.last_backend("shuffle_rank") == backend

    def g(a_, y_):  # single anchor, cap active on some terms (theta small)
        return K.shuffle_rank_loss(a_, y_, perm, 0.05, cap=2.0, backend=backend)

    assert torch.autograd.gradcheck(g, (xs[0], xs[2]), eps=1e-7, atol=1e-6)


def _capped_batch(gen):
    """Sample 0: every term far past the cap (x ~ 20 with theta = 0.05: each counterpart is nearly
    opposite, every negative nearly orthogonal); perturbed so that no gradient cancels by symmetry.
    Samples 1-3: random, some terms past the cap of 5 and some not."""
    d = 4
    e = torch.eye(d, dtype=torch.float64)[:2]  # e0, e1
    noise = 0.05 * torch.randn(3, 2, d, generator=gen, dtype=torch.float64)
    y0 = -(e + noise[2]) * torch.tensor([[1.7], [0.4]], dtype=torch.float64)  # raw scale: normalised inside
    a, a2, y, perm = make(3, 2, d, gen, scale_y=2.0)
    a = torch.cat([F.normalize(e + noise[0], dim=-1)[None], a])
    a2 = torch.cat([F.normalize(e + noise[1], dim=-1)[None], a2])
    y = torch.cat([y0[None], y])
    perm = torch.cat([torch.tensor([[0, 1]]), perm])
    return a, a2, y, perm


def test_capped_batch_is_what_it_claims(gen):
    a, a2, y, perm = _capped_batch(gen)
    for anchor in (a, a2):
        S, pos, neg = SR._rank_scores(anchor, SR._calibrate(y, perm))
        x = (S - pos.unsqueeze(-1))[:, neg] / 0.05
        assert bool((x[0] > 15).all())  # sample 0: every term capped at 5
        assert bool((x[1:] > 5).any()) and bool((x[1:] < 5).any())  # the others: both kinds


@pytest.mark.parametrize("device,backend", EVERY)
def test_cap_kills_gradient_and_inf_cap_does_not(device, backend, gen):
    """Terms past the cap get exactly zero gradient, the others their full gradient (equal to the
    reference's); with cap = inf nothing is cut. A backward that ignores the cap fails here."""
    a, a2, y, perm = _capped_batch(gen)
    dtype = exact_dtype(device, backend)
    for cap in (5.0, INF):
        ref = reference(a, a2, y, perm, 0.05, cap)
        res, grads = run(backend, a, a2, y, perm, 0.05, cap, dtype, device)
        assert_matches(res, grads, ref, 1e-5, dtype)
        assert float(res.accuracy[0]) < 1.0
        for name, g in zip(("anchor", "anchor2", "shuffled"), grads):
            g0, rest = g[0].abs().max().item(), g[1:].abs().max().item()
            assert rest > 1e-4, name  # uncapped terms keep their gradient
            if cap == 5.0:
                assert g0 == 0.0, f"{name}: a capped term has gradient {g0}"
            else:
                assert g0 > 1e-4, name


@pytest.mark.parametrize("backend", cpu_backends())
def test_order_of_shuffled_rows_is_folded_into_indexing(backend, gen):
    """Permuting the stored shuffled rows together with perm does not change the loss: calibration is
    pure indexing. And the identity permutation equals ranking against normalize(shuffled) directly."""
    a, a2, y, perm = make(5, 4, 6, gen)
    dtype = exact_dtype("cpu", backend)
    base = K.shuffle_rank_loss(a.to(dtype), y.to(dtype), perm, 0.1, backend=backend)
    sigma = torch.tensor([2, 0, 3, 1])
    again = K.shuffle_rank_loss(a.to(dtype), y[:, sigma].to(dtype), perm[:, sigma], 0.1, backend=backend)
    torch.testing.assert_close(base, again, rtol=1e-5, atol=1e-6)
    ident = torch.arange(4).expand(5, 4).contiguous()
    direct = SR.shuffle_rank_loss_reference(a, F.normalize(y, dim=-1), ident, 0.1)
    torch.testing.assert_close(K.shuffle_rank_loss(a.to(dtype), y.to(dtype), ident, 0.1, backend=backend).double(),
                               direct, rtol=1e-5, atol=1e-6)


def _strided_leaf(t, kind):
    """(leaf, view): a leaf tensor that holds t's values in a strided view, and that view."""
    B, s, d = t.shape
    if kind == "rows":  # every other row: row stride 2d
        leaf = torch.zeros(B, 2 * s, d, dtype=t.dtype, device=t.device)
        leaf[:, ::2] = t
        return leaf.requires_grad_(), lambda x: x[:, ::2]
    if kind == "cols":  # every other element: stride 2 along d
        leaf = torch.zeros(B, s, 2 * d, dtype=t.dtype, device=t.device)
        leaf[..., ::2] = t
        return leaf.requires_grad_(), lambda x: x[..., ::2]
    if kind == "batch_minor":  # batch innermost
        leaf = t.permute(1, 2, 0).contiguous()
        return leaf.requires_grad_(), lambda x: x.permute(2, 0, 1)
    raise ValueError(kind)


@pytest.mark.parametrize("device,backend", EVERY)
@pytest.mark.parametrize("kinds", [("rows", "cols", "batch_minor"), ("cols", "batch_minor", "rows")])
def test_strided_inputs_match_contiguous(device, backend, kinds, gen):
    """Row-strided, element-strided (stride != 1 along d) and batch-minor anchor, anchor2 and shuffled,
    and a transposed perm give the contiguous result (forward and gradients)."""
    a, a2, y, perm = make(4, 3, 10, gen, scale_y=2.0)
    dtype = exact_dtype(device, backend)
    base, base_grads = run(backend, a, a2, y, perm, 0.05, 5.0, dtype, device)
    leaves, views = zip(*(_strided_leaf(t.to(device=device, dtype=dtype), k) for t, k in zip((a, a2, y), kinds)))
    xs = [v(leaf) for v, leaf in zip(views, leaves)]
    perm_t = perm.t().contiguous().t().to(device)
    assert not perm_t.is_contiguous() and all(not x.is_contiguous() for x in xs)
    res = K.shuffle_rank_loss(xs[0], xs[2], perm_t, 0.05, cap=5.0, weight=0.5, anchor2=xs[1], weight2=0.7,
                              return_parts=True, backend=backend)
    (res.terms * torch.tensor([1.0, 0.5], dtype=res.terms.dtype, device=device)).sum().backward()
    torch.testing.assert_close(res.terms, base.terms)
    torch.testing.assert_close(res.accuracy, base.accuracy)
    for leaf, view, g in zip(leaves, views, base_grads):
        torch.testing.assert_close(view(leaf.grad), g)


@pytest.mark.parametrize("device,backend", EVERY)
def test_expanded_anchor_matches_materialised(device, backend, gen):
    """An anchor broadcast over the batch (stride 0) gives the result of its materialised copy."""
    a, _, y, perm = make(5, 2, 6, gen)
    dtype = exact_dtype(device, backend)
    one = a[:1].to(device=device, dtype=dtype)
    ys = y.to(device=device, dtype=dtype)
    outs, grads = [], []
    for expand in (True, False):
        leaf = one.clone().requires_grad_(True)
        anchor = leaf.expand(5, 2, 6) if expand else leaf.repeat(5, 1, 1)
        out = K.shuffle_rank_loss(anchor, ys, perm.to(device), 0.1, backend=backend)
        out.backward()
        outs.append(out)
        grads.append(leaf.grad)
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_zero_norm_shuffled_row_is_finite(gen):
    a, _, y, perm = make(2, 2, 5, gen)
    y[0, 1] = 0.0
    outs = {}
    for backend in cpu_backends():
        ya = y.clone().float().requires_grad_(True)
        out = K.shuffle_rank_loss(a.float(), ya, perm, 0.05, backend=backend)
        out.backward()
        assert torch.isfinite(out) and bool(torch.isfinite(ya.grad).all())
        outs[backend] = (out.item(), ya.grad)
    for v, g in outs.values():
        assert v == pytest.approx(outs["torch"][0], rel=1e-5)
        torch.testing.assert_close(g, outs["torch"][1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", EVERY)
def test_overflowing_norms_match_float64(device, backend, gen):
    """float32 shuffled rows near 1e30 (squares overflow), a row that grows past the others only in a
    later d-chunk, and a row near 1e-30 (norm below eps): the loss and the gradients of the float64
    reference on the same values."""
    a, _, y, perm = make(3, 6, 150, gen)  # s = 6: the Triton kernel takes d in chunks of 64
    y[0] *= 1e30
    y[1, :, 100:] *= 3e30
    y[2, 1] *= 1e-30
    dtype = torch.float32
    a, y = a.to(dtype), y.to(dtype)
    assert not bool(torch.isfinite((y.double() ** 2).sum(-1).to(dtype)).all())  # naive squares overflow
    yr = y.double().requires_grad_(True)
    ref = SR.shuffle_rank_loss_reference(a.double(), yr, perm, 0.5)
    ref.backward()
    ys = y.to(device).requires_grad_(True)
    out = K.shuffle_rank_loss(a.to(device), ys, perm.to(device), 0.5, backend=backend)
    out.backward()
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    g, gr = ys.grad.cpu().double().flatten(0, 1), yr.grad.flatten(0, 1)  # compare row by row: scales differ
    scale = gr.abs().amax(dim=-1, keepdim=True)
    assert bool(((g - gr).abs() <= 1e-4 * scale).all())


@pytest.mark.parametrize("device,backend", EVERY)
@pytest.mark.parametrize("where", ["anchor", "anchor2", "shuffled"])
@pytest.mark.parametrize("value", [math.nan, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the Triton interpreter's numpy
def test_non_finite_input_gives_nan(device, backend, where, value, gen):
    """NaN in, NaN out: one NaN or inf anywhere in anchor, anchor2 or shuffled makes the loss NaN."""
    a, a2, y, perm = make(5, 3, 8, gen, dtype=torch.float32)
    # Sample 3, component 5: negative in every row but row 1's counterpart (the shuffled row j with
    # perm[3, j] == 1). An inf in anchor row 1 then makes every similarity it touches +-inf with no
    # inf - inf, so without an explicit rule the loss would stay finite (cap 5) or be inf (no cap).
    for t in (a, a2, y):
        t[3, :, 5] = -t[3, :, 5].abs() - 0.1
    y[3, int((perm[3] == 1).nonzero()), 5] *= -1
    inputs = dict(anchor=a, anchor2=a2, shuffled=y)
    inputs[where][3, 1, 5] = value
    for cap in (5.0, INF):
        out = K.shuffle_rank_loss(inputs["anchor"].to(device), inputs["shuffled"].to(device), perm.to(device), 0.05,
                                  cap=cap, anchor2=inputs["anchor2"].to(device), backend=backend)
        assert math.isnan(out.item()), (cap, out.item())


@pytest.mark.parametrize("device,backend", EVERY)
def test_double_backward_refused(device, backend, gen):
    """A second-order gradient would silently miss the fused backward's own derivative (here through a
    twice-differentiable normalize upstream): refused with a message that says so, on every backend."""
    a, _, y, perm = make(3, 2, 5, gen)
    dtype = exact_dtype(device, backend)
    feats = a.to(device=device, dtype=dtype).requires_grad_(True)
    loss = K.shuffle_rank_loss(F.normalize(feats, dim=-1), y.to(device=device, dtype=dtype), perm.to(device), 0.1,
                               backend=backend)
    with pytest.raises(RuntimeError, match="differentiable once.*create_graph=True"):
        torch.autograd.grad(loss, feats, create_graph=True)
    loss.backward()  # a first-order backward of the same graph still works
    assert feats.grad is not None and bool(torch.isfinite(feats.grad).all())


@pytest.mark.parametrize("device,backend", EVERY)
def test_forward_is_deterministic(device, backend, gen):
    """The same bits on every run, also under torch.use_deterministic_algorithms (no atomics: each GPU
    program writes its partial sums, added in a fixed order)."""
    B = 5000 if device == "cuda" else 7  # on a GPU: > 2048 samples, so several samples per program
    a, a2, y, perm = make(B, 3, 16, gen, dtype=torch.float32)
    args = [t.to(device) for t in (a, y, perm)]
    run_once = lambda: K.shuffle_rank_loss(*args, 0.05, anchor2=a2.to(device), return_parts=True, backend=backend)
    first = run_once()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(3):
            again = run_once()
            assert torch.equal(again.terms, first.terms) and torch.equal(again.accuracy, first.accuracy)
    finally:
        torch.use_deterministic_algorithms(prev)


# ------------------------------------------------------------------------------- malformed input
def _bad_cases(device):
    a, a2, y, perm = make(3, 2, 4, torch.Generator().manual_seed(0), dtype=torch.float32)
    a, a2, y, perm = (t.to(device) for t in (a, a2, y, perm))
    other = "meta" if device == "cpu" else "cpu"
    grad_scalar = torch.tensor(0.1, requires_grad=True)
    big = torch.randn(3, 9, 4, device=device)
    wide = torch.randn(3, 2, 513, device=device)
    return [
        ("anchor_none", dict(anchor=None), ValueError, r"anchor must be a 3-D tensor \(B, s, d\), got NoneType"),
        ("anchor_list", dict(anchor=[[0.0]]), ValueError, "anchor must be a 3-D tensor"),
        ("anchor_2d", dict(anchor=a[0]), ValueError, r"anchor must be a 3-D tensor \(B, s, d\), got a torch.float32"),
        ("anchor_int", dict(anchor=a.int(), shuffled=y.int()), TypeError, "anchor must be float32, float16, bfloat16"),
        ("shuffled_none", dict(shuffled=None), ValueError, "shuffled must be a 3-D tensor"),
        ("shuffled_shape", dict(shuffled=y[:, :, :3]), ValueError, r"shuffled must have anchor's shape .*\(3, 2, 4\)"),
        ("shuffled_dtype", dict(shuffled=y.double()), TypeError,
         "shuffled is torch.float64 but anchor is torch.float32"),
        ("shuffled_device", dict(shuffled=y.to(other)), ValueError, f"shuffled is on {other}"),
        ("anchor2_shape", dict(anchor2=a2[:2]), ValueError, "anchor2 must have anchor's shape"),
        ("anchor2_dtype", dict(anchor2=a2.half()), TypeError, "anchor2 is torch.float16 but anchor"),
        ("one_series", dict(anchor=a[:, :1], shuffled=y[:, :1], perm=perm[:, :1]), ValueError, "2 to 8 series"),
        ("nine_series", dict(anchor=big, shuffled=big, perm=torch.arange(9, device=device).repeat(3, 1)), ValueError,
         "2 to 8 series"),
        ("d_513", dict(anchor=wide, shuffled=wide), ValueError, r"d must be in 1\.\.512, got d=513"),
        ("d_0", dict(anchor=a[..., :0], shuffled=y[..., :0]), ValueError, r"d must be in 1\.\.512, got d=0"),
        ("empty_batch", dict(anchor=a[:0], shuffled=y[:0], perm=perm[:0]), ValueError, "at least one clip"),
        ("perm_int32", dict(perm=perm.int()), ValueError, r"perm must be an int64 tensor \(B, s\) = \(3, 2\)"),
        ("perm_shape", dict(perm=perm[:2]), ValueError, "perm must be an int64 tensor"),
        ("perm_list", dict(perm=[[0, 1]] * 3), ValueError, "perm must be an int64 tensor"),
        ("perm_device", dict(perm=perm.to(other)), ValueError, f"perm is on {other}"),
        ("perm_not_permutation", dict(perm=torch.zeros_like(perm)), ValueError, "every row must be a permutation"),
        ("theta_zero", dict(theta=0.0), ValueError, "theta must be a positive finite number"),
        ("theta_negative", dict(theta=-0.1), ValueError, "theta must be a positive finite number"),
        ("theta_inf", dict(theta=INF), ValueError, "theta must be a positive finite number"),
        ("theta_nan", dict(theta=math.nan), ValueError, "theta must be a positive finite number"),
        ("theta_str", dict(theta="0.1"), TypeError, "theta must be a positive finite number, got str"),
        ("theta_bool", dict(theta=True), TypeError, "theta must be a positive finite number, got bool"),
        ("theta_vector", dict(theta=torch.tensor([0.1, 0.2])), TypeError, "theta must be a positive finite number"),
        ("theta_requires_grad", dict(theta=grad_scalar), ValueError, "theta is a tensor that requires grad"),
        ("cap_nan", dict(cap=math.nan), ValueError, "cap must be a number or float"),
        ("cap_none", dict(cap=None), TypeError, "cap must be a number or float"),
        ("cap_requires_grad", dict(cap=grad_scalar), ValueError, "cap is a tensor that requires grad"),
        ("weight_nan", dict(weight=math.nan), ValueError, "weight must be a finite number"),
        ("weight_requires_grad", dict(weight=grad_scalar), ValueError, "weight is a tensor that requires grad"),
        ("weight2_without_anchor2", dict(weight2=0.5), ValueError, "weight2 is given but anchor2 is None"),
        ("weight2_requires_grad", dict(anchor2=a2, weight2=grad_scalar), ValueError,
         "weight2 is a tensor that requires grad"),
        ("check_perm_str", dict(check_perm="yes"), TypeError, "check_perm must be True or False"),
        ("return_parts_int", dict(return_parts=1), TypeError, "return_parts must be True or False"),
        ("backend_unknown", dict(backend="tpu"), K.BackendUnavailable, "unknown backend 'tpu'"),
    ], dict(anchor=a, shuffled=y, perm=perm)


BAD_IDS = [c[0] for c in _bad_cases("cpu")[0]]


@pytest.mark.parametrize("device,backend", EVERY)
@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_input_named_before_any_kernel(device, backend, case, monkeypatch):
    """Every malformed argument: an exception naming it and what was expected, the same from every
    backend, before any kernel runs (the backend's kernels are replaced by ones that fail the test)."""
    cases, good = _bad_cases(device)
    kwargs, exc, msg = next(c[1:] for c in cases if c[0] == case)

    def kernel(*args):
        raise AssertionError("a kernel ran on malformed input")
    monkeypatch.setitem(SR._IMPLS, backend, OpImpl(kernel, kernel))
    with pytest.raises(exc, match=msg):
        K.shuffle_rank_loss(**{**good, "backend": backend, **kwargs})


@pytest.mark.parametrize("backend", cpu_backends())
def test_scalars_as_tensors_without_grad(backend, gen):
    a, _, y, perm = make(3, 2, 4, gen, dtype=torch.float32)
    plain = K.shuffle_rank_loss(a, y, perm, 0.1, cap=2.0, weight=0.5, backend=backend)
    as_tensors = K.shuffle_rank_loss(a, y, perm, torch.tensor(0.1), cap=torch.tensor(2.0), weight=torch.tensor(0.5),
                                     backend=backend)
    assert torch.equal(plain, as_tensors)


def test_compiled_op_checks_inputs_itself(gen):
    """The C++ op validates too (callers of torch.ops.dualvar.* skip the Python checks)."""
    assert compiled_op_reason(*SR.COMPILED_OPS) is None  # loads the extension
    a, _, y, perm = make(3, 2, 4, gen, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="not a permutation"):
        torch.ops.dualvar.shuffle_rank_fwd(a, None, y, torch.zeros_like(perm), 20.0, 5.0, 1.0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match=r"anchor must have 2\.\.8 series"):
        torch.ops.dualvar.shuffle_rank_fwd(a[:, :1], None, y[:, :1], perm[:, :1], 20.0, 5.0, 1.0, 0.0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("two", [False, True])
def test_compiled_ops_pass_opcheck(dtype, two, gen):
    """Schema, fake (meta) functions and dispatcher registration agree (torch.library.opcheck)."""
    assert compiled_op_reason(*SR.COMPILED_OPS) is None  # also registers the fake functions
    a, a2, y, perm = make(3, 3, 5, gen, dtype=dtype)
    a2 = a2 if two else None
    fwd_args = (a, a2, y, perm, 20.0, 5.0, 0.1, 0.2 if two else 0.0, 0.05)
    torch.library.opcheck(torch.ops.dualvar.shuffle_rank_fwd.default, fwd_args)
    grad = torch.rand(2 if two else 1, generator=gen)
    torch.library.opcheck(torch.ops.dualvar.shuffle_rank_bwd.default, (a, a2, y, perm, grad, 20.0, 5.0, 0.3, 0.4))


def test_float64_refused_on_gpu_backends():
    a = torch.randn(2, 2, 3, dtype=torch.float64)
    for backend in ("cuda", "triton"):
        with pytest.raises(K.BackendUnavailable):
            K.shuffle_rank_loss(a, a, torch.tensor([[0, 1], [1, 0]]), backend=backend)


def test_auto_picks_compiled_cpu_kernel(gen):
    a, _, y, perm = make(2, 2, 3, gen, dtype=torch.float32)
    K.shuffle_rank_loss(a, y, perm)
    assert K.last_backend("shuffle_rank") == "cpu"


# ------------------------------------------------------------------ ahead-of-time compilation
AOT_CASES = [(2, 64, "fp32", True), (2, 64, "bf16", True), (2, 64, "fp16", False), (2, 512, "bf16", True),
             (3, 130, "fp32", True), (4, 512, "bf16", True), (8, 512, "bf16", True), (8, 64, "fp32", False)]
FLOAT_ARGS = ("inv_theta", "cap", "coef0", "coef2", "acc_scale", "gcoef0", "gcoef2")


def _aot_spec(kind, s, d, dt, two, arch):
    """One kernel specialisation as the runtime compiles it for contiguous inputs (unit strides along d
    and for perm are specialised to the constant 1)."""
    from dualvar.kernels import shuffle_rank_triton as TRI
    SP, BLOCK_D, num_warps, _ = TRI.triton_config(s, d, 4096)
    kernel = getattr(TRI, f"_shuffle_rank_{kind}_kernel")
    constexprs = dict(TWO=two, SP=SP, BLOCK_D=BLOCK_D, EPS_=TRI.EPS, s_ad=1, s_a2d=1, s_yd=1, s_ps=1)
    types = dict(perm_ptr="*i64", part_ptr="*fp32", g_ptr="*fp32")
    signature = {name: types.get(name, f"*{dt}") if name.endswith("_ptr") else "fp32" if name in FLOAT_ARGS else "i32"
                 for name in kernel.arg_names if name not in constexprs}
    return dict(module="dualvar.kernels.shuffle_rank_triton", kernel=kernel.__name__, signature=signature,
                constexprs=constexprs, arch=arch, num_warps=num_warps)


@pytest.fixture(scope="module")
def aot_reports():
    pytest.importorskip("triton")
    keys = [(kind, *case, arch) for case in AOT_CASES for kind in ("fwd", "bwd") for arch in (90, 80)]
    return dict(zip(keys, _aot.compile_many([_aot_spec(*k) for k in keys])))


def test_triton_kernels_compile_within_limits(aot_reports):
    assert len(aot_reports) == len(AOT_CASES) * 2 * 2
    for key, rep in aot_reports.items():
        assert rep.arch == key[-1]
        assert rep.within_limits() and rep.registers <= 255, (key, rep)
        assert rep.spill_stores == 0 and rep.spill_loads == 0, (key, rep)


def test_triton_config_fails_clearly():
    TRI = pytest.importorskip("dualvar.kernels.shuffle_rank_triton")
    with pytest.raises(ValueError, match="supports"):
        TRI.triton_config(9, 64, 10)
    with pytest.raises(ValueError, match="supports"):
        TRI.triton_config(2, 513, 10)


# ------------------------------------------------------------------------------------- GPU
def accuracy_bounds(anchor, shuffled, perm, tol):
    """(lo, hi): the reference's accuracy when every negative within tol of its row's counterpart
    similarity may rank either way (ties broken by rounding)."""
    S, pos, neg = SR._rank_scores(anchor, SR._calibrate(shuffled, perm))
    B, n = pos.shape
    margin = (S[:, neg].view(B, n, n - 2) - pos.unsqueeze(-1)).amax(dim=-1)  # > 0: a negative wins
    return float((margin < -tol).double().mean()), float((margin <= tol).double().mean())


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,s,d,cap", [(1, 2, 7, 5.0), (17, 3, 130, INF), (4096, 2, 64, 5.0), (33, 8, 512, INF),
                                       (5, 5, 1, 5.0)])
def test_gpu_backends_equal_reference(backend, dtype, B, s, d, cap, gen):
    a, a2, y, perm = make(B, s, d, gen, scale_y=2.0)
    a, a2, y = (t.to(dtype) for t in (a, a2, y))  # the reference sees the same rounded inputs
    res, grads = run(backend, a, a2, y, perm, 0.05, cap, dtype, "cuda")
    terms, _, grads_ref = reference(a, a2, y, perm, 0.05, cap)
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(res.terms.cpu().double(), terms, rtol=tol, atol=tol)
    for k, anchor in enumerate((a, a2)):
        acc = float(res.accuracy[k])
        if d == 1:  # every similarity is exactly +-1: correctly rounded normalisation keeps the ties exact
            assert abs(acc - float(SR.shuffle_rank_accuracy_reference(anchor.double(), y.double(), perm))) < 1e-6
        lo, hi = accuracy_bounds(anchor.double(), y.double(), perm, 1e-4)
        assert lo - 1e-6 <= acc <= hi + 1e-6, (k, lo, acc, hi)
    for g, gr in zip(grads, grads_ref):
        gmax = float(gr.abs().max())
        torch.testing.assert_close(g.cpu().double(), gr, rtol=tol * 4, atol=tol * max(gmax, 1e-3))


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_one_launch_per_direction(backend, gen):
    """Forward and backward are one shuffle-rank kernel each (besides allocation and the fixed-order sum)."""
    from torch.profiler import ProfilerActivity, profile
    a, a2, y, perm = make(4096, 2, 64, gen)
    xs = [t.float().cuda().requires_grad_(True) for t in (a, a2, y)]
    perm = perm.cuda()
    ones = torch.ones(2, device="cuda")
    run_once = lambda: K.shuffle_rank_loss(xs[0], xs[2], perm, 0.05, weight=0.5, anchor2=xs[1], check_perm=False,
                                           return_parts=True, backend=backend).terms.backward(ones)
    run_once()  # compile / warm up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_once()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA" and "shuffle_rank" in e.name]
    assert len([n for n in names if "fwd" in n]) == 1 and len([n for n in names if "bwd" in n]) == 1, names


@needs_two_gpus
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_gpu_tensors_off_the_current_device(backend, gen):
    """Inputs on cuda:1 while cuda:0 is current: the launch follows the tensors' device."""
    a, a2, y, perm = make(33, 3, 40, gen)
    ref = reference(a, a2, y, perm, 0.05, 5.0)
    with torch.cuda.device(0):
        res, grads = run(backend, a, a2, y, perm, 0.05, 5.0, torch.float32, "cuda:1")
    assert res.terms.device == torch.device("cuda:1")
    assert_matches(res, grads, ref, 1e-4, torch.float32)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_offsets_past_int32(backend, gen):
    """B * s * d > 2^31 elements per input (bf16, ~26 GB in all): a periodic batch (7 distinct samples
    repeated) has the loss of its period and each copy 1/repeats of the period's gradient."""
    s, d, period = 2, 512, 7
    repeats = -(-(2 ** 31 // (s * d) + 64) // period)
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30:
        pytest.skip("needs 40 GB of GPU memory")
    a, a2, y, perm = make(period, s, d, gen, dtype=torch.bfloat16, scale_y=2.0)
    terms, _, grads_ref = reference(a, a2, y, perm, 0.05, 5.0)
    big = [t.cuda().repeat(repeats, 1, 1).requires_grad_(True) for t in (a, a2, y)]
    assert big[0].numel() > 2 ** 31
    res = K.shuffle_rank_loss(big[0], big[2], perm.cuda().repeat(repeats, 1), 0.05, cap=5.0, weight=0.5,
                              anchor2=big[1], weight2=0.7, return_parts=True, check_perm=False, backend=backend)
    (res.terms * torch.tensor([1.0, 0.5], device="cuda")).sum().backward()
    torch.testing.assert_close(res.terms.cpu().double(), terms, rtol=2e-2, atol=2e-2)
    for x, gr in zip(big, grads_ref):
        for copy in (0, repeats - 1):  # the first and the last copy (offsets past 2^31)
            g = x.grad[copy * period:(copy + 1) * period].cpu().double() * repeats
            torch.testing.assert_close(g, gr, rtol=5e-2, atol=2e-2 * float(gr.abs().max()))
