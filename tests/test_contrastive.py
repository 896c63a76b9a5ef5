"""Fused contrastive losses: every backend that runs here against the float64 references, forward
and gradients, over odd shapes and all variants; numerics; memory; AOT compilation; GPU checks."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dualvar.kernels as K
from conftest import cpu_backends, needs_gpu
from dualvar.kernels import _aot, contrastive_triton
from dualvar.kernels._ext import load_ext

BACKENDS = cpu_backends()


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


# Shapes: (n_views, N, D). N = 1, odd row counts, D not a power of two, D > one Triton chunk.
NT_SHAPES = [(2, 1, 8), (2, 5, 7), (3, 4, 16), (2, 37, 33), (2, 70, 130)]


# float64 runs on the torch and cpu backends (the GPU kernels refuse it: test_triton_refuses_...).
BACKEND_DTYPES = [(b, d) for b in BACKENDS for d in (torch.float32, torch.float64) if (b, d) != ("triton", torch.float64)]


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
    tau = 0.1
    if case == "non_unit":
        z = torch.randn(40, 24, generator=gen, dtype=torch.float64) * 3
    elif case == "identical_rows":
        z = unit(1, 16, gen=gen).repeat(30, 1)
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
    """METHOD.md 3.2: the reference builds the (2B, 2N, s, s) tensor of all series similarities and
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


@pytest.mark.skipif(TRITON_DEVICE is None, reason="needs a GPU")
@pytest.mark.parametrize("weight", [1e-5, 1e6])
def test_triton_fp16_backward_neither_underflows_nor_overflows(weight, gen):
    """float16 inputs: the backward casts H = g p / tau to float16 for its H @ z product. A small
    loss weight puts H among float16's subnormals, a loss-scaled gradient (GradScaler) past 65504;
    the gradient must keep float16-input accuracy either way (float64 on the same rounded inputs)."""
    M, tau = 256, 0.07
    z16 = unit(M, 32, gen=gen, dtype=torch.float16).to(TRITON_DEVICE)
    g = torch.full((M,), weight / M, dtype=torch.float32, device=TRITON_DEVICE)
    lse = contrastive_triton.lse_forward(z16, z16, tau, 0)
    out = contrastive_triton.lse_backward_sym(z16, tau, lse, g)
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
    load_ext()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        z = torch.randn(1302, 19, generator=gen, dtype=torch.float64)  # non-unit rows, 3 tiles, last ragged
        sym = torch.ops.dualvar.lse_fwd(z, z, 0.2, 0)
        rows = torch.ops.dualvar.lse_fwd(z, z.clone(), 0.2, 0)
        s = z @ z.t() / 0.2
        s.fill_diagonal_(float("-inf"))
        ref = torch.logsumexp(s, dim=1)
        assert (sym - ref).abs().max() < 1e-10 and (rows - ref).abs().max() < 1e-10
        ref_loss, (gref,) = grads_of(lambda x: K.nt_xent_loss_reference(x, 0.2), (z, True))
        out, (g,) = grads_of(lambda x: K.nt_xent_loss(x, 0.2, backend="cpu"), (z, True))
        close(out, ref_loss, torch.float64)
        close(g, gref, torch.float64)
        z[1000, 3] = float("nan")  # a row of the third tile: its lse and the loss must be NaN, not dropped
        lse = torch.ops.dualvar.lse_fwd(z, z, 0.2, 0)
        assert torch.isnan(lse).all()  # every row sees the NaN column
        assert torch.isnan(torch.ops.dualvar.lse_fwd(z, z.clone(), 0.2, 0)).all()  # row-block path too
        assert torch.isnan(K.nt_xent_loss(z, 0.2, check_finite=False, backend="cpu"))
    finally:
        torch.set_num_threads(old)


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


def test_bad_inputs_name_the_problem(gen):
    z = unit(6, 4, gen=gen).float()
    with pytest.raises(ValueError, match="n_views=4"):
        K.nt_xent_loss(z, n_views=4)
    with pytest.raises(ValueError, match="2-D"):
        K.nt_xent_loss(z[None])
    with pytest.raises(ValueError, match="temperature"):
        K.nt_xent_loss(z, temperature=0.0)
    with pytest.raises(TypeError, match="floating"):
        K.nt_xent_loss(torch.ones(6, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="same shape"):
        K.info_nce_loss(z, z[:3])
    with pytest.raises(ValueError, match="queue has dim"):
        K.info_nce_loss(z, z, torch.randn(5, 3))
    with pytest.raises(RuntimeError, match="same dim"):
        torch.ops.dualvar.lse_fwd(z, torch.randn(3, 5), 0.1, None)


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
FWD_SIG = {"Q": "*{t}", "K": "*{t}", "LSE": "*fp32", "R": "i32", "C": "i32", "D": "i32", "stride_q": "i32",
           "stride_k": "i32", "scale_log2": "fp32", "offset": "i32"}
BWD_SIG = {"X": "*{t}", "Y": "*{t}", "LSE_R": "*fp32", "G_R": "*fp32", "LSE_C": "*fp32", "G_C": "*fp32",
           "OUT": "*fp32", "R": "i32", "C": "i32", "D": "i32", "stride_x": "i32", "stride_y": "i32",
           "stride_o": "i32", "scale": "fp32", "scale_log2": "fp32", "offset": "i32"}
DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


AOT_CASES = [(kind, D, t, arch) for kind in ("fwd", "bwd") for D in (64, 128, 256, 1024)
             for t in ("bf16", "fp16", "fp32") for arch in (80, 90)]


def _spec(kind, D, t, arch):
    cfg = contrastive_triton.block_config(kind, D, DT[t])
    const = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "D_CHUNKS")}
    const.update(HAS_OFFSET=True, INPUT_PRECISION="tf32x3" if t == "fp32" else "tf32")
    if kind == "bwd":
        const.update(ROW_TERM=True, COL_TERM=True)
    sig = FWD_SIG if kind == "fwd" else BWD_SIG
    return {"module": "dualvar.kernels.contrastive_triton", "kernel": f"_lse_{kind}_kernel",
            "signature": {k: v.format(t=t) for k, v in sig.items()}, "constexprs": const, "arch": arch,
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


@pytest.fixture(scope="module")
def aot_reports():
    return dict(zip(AOT_CASES, _aot.compile_many([_spec(*c) for c in AOT_CASES])))


@pytest.mark.parametrize("kind,D,t,arch", AOT_CASES)
def test_triton_kernels_compile_within_limits(aot_reports, kind, D, t, arch):
    rep = aot_reports[(kind, D, t, arch)]
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
    from dualvar.kernels._ext import load_ext
    load_ext()
    q, k = unit(9, 5, gen=gen).float(), unit(13, 5, gen=gen).float()
    lse = torch.ops.dualvar.lse_fwd(q, k, 0.2, 2)
    grad = torch.rand(9, generator=gen)
    torch.library.opcheck(torch.ops.dualvar.lse_fwd.default, (q, k, 0.2, 2))
    torch.library.opcheck(torch.ops.dualvar.lse_bwd.default, (q, k, lse, grad, 0.2, 2, True, True))
    z = unit(12, 5, gen=gen).float()
    zl = torch.ops.dualvar.lse_fwd(z, z, 0.2, 0)
    torch.library.opcheck(torch.ops.dualvar.lse_bwd_sym.default, (z, zl, torch.rand(12, generator=gen), 0.2))
    video = torch.randint(0, 256, (2, 4, 3, 5, 3), dtype=torch.uint8, generator=gen)
    lut = K.normalization_lut((0.5,) * 3, (0.2,) * 3, torch.bfloat16, "cpu")
    torch.library.opcheck(torch.ops.dualvar.permute_frames.default, (video, K.identity_index(2, 4), lut, None))
