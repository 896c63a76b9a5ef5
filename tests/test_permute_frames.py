"""permute_frames: reference vs a literal loop, every backend vs the reference (any strides), index
maps, bad input on every backend, the compiled op's own checks, ahead-of-time compilation, GPU checks."""
import importlib
import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dualvar.kernels as K
from dualvar.kernels import _aot
from dualvar.kernels._dispatch import OpImpl
from dualvar.kernels.info import thp_mode
from helpers import cpu_backends, needs_gpu, needs_two_gpus

PF = importlib.import_module("dualvar.kernels.permute_frames")  # the module (K.permute_frames is the function)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def literal_loop(video, index, mean, std, out_dtype, hflip):
    """Element-by-element transcription of the definition, numpy float32 arithmetic."""
    v = video.numpy()
    B, T, H, W, C = v.shape
    Tp = index.shape[1]
    out = np.empty((B, C, Tp, H, W), dtype=np.float32)
    m = np.asarray(mean, dtype=np.float32)
    s = np.asarray(std, dtype=np.float32)
    for b in range(B):
        for c in range(C):
            for t in range(Tp):
                for h in range(H):
                    for w in range(W):
                        ws = W - 1 - w if (hflip is not None and hflip[b]) else w
                        x = np.float32(v[b, int(index[b, t]), h, ws, c]) / np.float32(255)
                        out[b, c, t, h, w] = (x - m[c]) / s[c]
    return torch.from_numpy(out).to(out_dtype)


def make(B, T, H, W, C, Tp, gen, flip=True):
    video = torch.randint(0, 256, (B, T, H, W, C), dtype=torch.uint8, generator=gen)
    index = torch.randint(0, T, (B, Tp), generator=gen)
    hflip = torch.rand(B, generator=gen) < 0.5 if flip else None
    if flip and B > 1:
        hflip[0], hflip[1] = True, False
    return video, index, hflip


@pytest.mark.parametrize("C", [1, 3])
def test_reference_matches_literal_loop(C, gen):
    video, index, hflip = make(2, 5, 4, 6, C, 3, gen)
    mean, std = MEAN[:C], STD[:C]
    ref = K.permute_frames_reference(video, index, mean, std, hflip=hflip)
    assert torch.equal(ref, literal_loop(video, index, mean, std, torch.float32, hflip))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 13, 17, 3, 5), (1, 1, 1, 1, 3, 1), (2, 4, 5, 33, 1, 9), (4, 16, 8, 8, 3, 16)])
@pytest.mark.parametrize("flip", [False, True])
def test_backends_equal_reference(backend, out_dtype, shape, flip, gen):
    B, T, H, W, C, Tp = shape
    video, index, hflip = make(B, T, H, W, C, Tp, gen, flip)
    mean, std = MEAN[:C], STD[:C]
    ref = K.permute_frames_reference(video, index, mean, std, out_dtype=out_dtype, hflip=hflip)
    out = K.permute_frames(video, index, mean, std, out_dtype=out_dtype, hflip=hflip, backend=backend)
    assert K.last_backend("permute_frames") == backend
    assert out.dtype == out_dtype and out.shape == (B, C, Tp, H, W) and out.is_contiguous()
    # All backends normalise through the reference's float32 ops, so equality is exact in every dtype.
    assert torch.equal(out, ref)


def strided_cases(gen, device="cpu"):
    """(name, video, index, hflip) with non-contiguous, sliced, expanded and channels-last layouts."""
    g = lambda *shape, high=256, dtype=torch.uint8: torch.randint(0, high, shape, dtype=dtype, generator=gen).to(device)
    B, T, H, W = 3, 6, 5, 9
    video = g(B, T, H, W, 3)
    index = g(B, 4, high=T, dtype=torch.int64)
    # (B, V) per-view flags; column 1 is [T, F, T], and reading it at offsets b instead of b * 3 gives [T, T, F]
    mask = torch.tensor([[False, True, True], [False, False, False], [False, True, True]], device=device)
    yield "contiguous", video, index, mask[:, 1].contiguous()
    yield "video_strided_in_time", g(B, 2 * T, H, W, 3)[:, ::2], index, None
    yield "video_sliced_h_w", g(B, T, H + 3, W + 4, 3)[:, :, 1:-2, 2:-2], index, mask[:, 1].contiguous()
    yield "video_channels_last", g(B, T, 3, H, W).permute(0, 1, 3, 4, 2), index, None
    yield "video_channel_slice", g(B, T, H, W, 4)[..., 1:], index, None
    yield "video_expanded", g(1, T, H, W, 3).expand(B, T, H, W, 3), index, None
    yield "index_transposed", video, g(4, B, high=T, dtype=torch.int64).t(), None
    yield "index_column_slice", video, g(B, 8, high=T, dtype=torch.int64)[:, ::2], None
    yield "hflip_mask_column", video, index, mask[:, 1]
    yield "hflip_expanded", video, index, torch.tensor([True], device=device).expand(B)


@pytest.mark.parametrize("backend", cpu_backends())
def test_strided_inputs_equal_contiguous(backend, gen):
    """Any layout of video, frame_index and hflip gives the values of the contiguous copies (a kernel
    reading hflip[b] at offset b instead of b * stride flips the wrong clips of a (B, V) mask column)."""
    for name, video, index, hflip in strided_cases(gen):
        assert name == "contiguous" or not all(t is None or t.is_contiguous() for t in (video, index, hflip))
        contiguous = [t if t is None else t.contiguous() for t in (video, index, hflip)]
        ref = K.permute_frames_reference(contiguous[0], contiguous[1], MEAN, STD, hflip=contiguous[2])
        out = K.permute_frames(video, index, MEAN, STD, hflip=hflip, backend=backend)
        assert K.last_backend("permute_frames") == backend
        assert torch.equal(out, ref), name


@pytest.mark.parametrize("backend", cpu_backends())
def test_mean_std_forms(backend, gen):
    """A sequence, a tensor of C values in any shape ((C,), (1, C), (C, 1, 1)), or one number for every
    channel: all the same table."""
    video, index, hflip = make(2, 5, 4, 6, 3, 3, gen)
    ref = K.permute_frames_reference(video, index, MEAN, STD, hflip=hflip)
    for mean in (MEAN, list(MEAN), torch.tensor(MEAN), torch.tensor([MEAN]), torch.tensor(MEAN).view(3, 1, 1),
                 torch.tensor(MEAN, dtype=torch.float64), np.asarray(MEAN)):
        out = K.permute_frames(video, index, mean, STD, hflip=hflip, backend=backend)
        assert torch.equal(out, ref), type(mean)
    one = K.permute_frames_reference(video, index, (0.5,) * 3, (0.25,) * 3)
    for m, s in ((0.5, 0.25), (torch.tensor(0.5), torch.tensor([0.25])), ([0.5], 0.25)):
        assert torch.equal(K.permute_frames(video, index, m, s, backend=backend), one)
    assert torch.equal(K.permute_frames_reference(video, index, 0.5, 0.25), one)


def test_auto_picks_compiled_cpu_kernel(gen):
    video, index, hflip = make(2, 3, 4, 5, 3, 3, gen)
    K.permute_frames(video, index, MEAN, STD, hflip=hflip)
    assert K.last_backend("permute_frames") == "cpu"


def _anon_huge_kib(t):
    """AnonHugePages (KiB) summed over the /proc/self/smaps mappings that overlap t's memory."""
    begin, end = t.data_ptr(), t.data_ptr() + t.nbytes
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo < end and hi > begin
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1])
    return total


_HUGE_PROBE = """
import sys, torch
sys.path.insert(0, {tests!r})
import dualvar.kernels as K
from test_permute_frames import _anon_huge_kib
g = torch.Generator().manual_seed(0)
# 38.5 MB of output: above glibc's largest mmap threshold (32 MiB), so it is fresh memory, not a
# reused (already touched) heap chunk, whose pages stay as they are.
video = torch.randint(0, 256, (8, 8, 224, 224, 3), dtype=torch.uint8, generator=g)
index = torch.randint(0, 8, (8, 8), generator=g)
out = K.permute_frames(video, index, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), backend="cpu")
assert torch.equal(out, K.permute_frames_reference(video, index, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)))
print(_anon_huge_kib(out))
"""


def _huge_kib_in_fresh_process(advice: bool) -> int:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env["DUALVAR_HUGEPAGES"] = "1" if advice else "0"
    code = _HUGE_PROBE.format(tests=os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split()[-1])


def test_cpu_output_backed_by_huge_pages():
    """The cpu kernel advises huge pages for its fresh output (37,000 4 KiB faults cost more than
    the permutation at 16x16x224x224); with the advice off (DUALVAR_HUGEPAGES=0) the same output
    gets none. Fresh processes, so no earlier test's memory is in play."""
    mode = thp_mode()
    with_advice = _huge_kib_in_fresh_process(True)
    if mode not in ("always", "madvise"):  # never, or no THP in this kernel
        assert with_advice == 0
        return
    assert with_advice >= 2048, "cpu permute_frames output got no huge page"
    if mode == "madvise":
        assert _huge_kib_in_fresh_process(False) == 0


def test_index_maps(gen):
    idx = K.identity_index(3, 8)
    assert torch.equal(idx, torch.arange(8).repeat(3, 1))
    rev = K.time_reverse_index(idx, torch.tensor([True, False, True]))
    assert rev[0].tolist() == list(range(7, -1, -1)) and rev[1].tolist() == list(range(8))
    perm = torch.tensor([[1, 0], [0, 1], [1, 0]])
    shuf = K.segment_shuffle_index(idx, perm)
    assert shuf[0].tolist() == [4, 5, 6, 7, 0, 1, 2, 3] and shuf[1].tolist() == list(range(8))
    perm3 = torch.tensor([[2, 0, 1]])
    base = torch.tensor([[10, 11, 12, 13, 14, 15]])
    assert K.segment_shuffle_index(base, perm3)[0].tolist() == [14, 15, 10, 11, 12, 13]
    with pytest.raises(ValueError, match="equal segments"):
        K.segment_shuffle_index(K.identity_index(2, 7), torch.tensor([[0, 1], [1, 0]]))


def test_shuffled_view_through_kernel(gen):
    """A segment shuffle as an index map moves whole segments of the normalised clip."""
    video = torch.randint(0, 256, (2, 8, 4, 4, 3), dtype=torch.uint8, generator=gen)
    perm = torch.tensor([[1, 0], [0, 1]])
    plain = K.permute_frames(video, K.identity_index(2, 8), MEAN, STD)
    shuf = K.permute_frames(video, K.segment_shuffle_index(K.identity_index(2, 8), perm), MEAN, STD)
    assert torch.equal(shuf[0, :, :4], plain[0, :, 4:]) and torch.equal(shuf[0, :, 4:], plain[0, :, :4])
    assert torch.equal(shuf[1], plain[1])


def _bad_cases(video, index):
    B = video.shape[0]
    return [
        # (id, overrides, exception, message)
        ("video_float", dict(video=video.float()), TypeError, "video must be uint8"),
        ("video_4d", dict(video=video[0]), ValueError, "video must be a 5-D"),
        ("video_list", dict(video=video.tolist()), ValueError, "video must be a 5-D"),
        ("video_channels_first", dict(video=video.permute(0, 1, 4, 2, 3).contiguous()), ValueError,
         "1 or 3 channels"),
        ("index_past_end", dict(frame_index=index + 5), IndexError, "video has 5 frames"),
        ("index_negative", dict(frame_index=index - 5), IndexError, r"frame_index holds values in \[-\d+"),
        ("index_int32", dict(frame_index=index.int()), TypeError, "frame_index must be int64"),
        ("index_rows", dict(frame_index=index[:1]), ValueError, "frame_index must be"),
        ("index_list", dict(frame_index=index.tolist()), ValueError, "frame_index must be"),
        ("index_1d", dict(frame_index=index[0]), ValueError, "frame_index must be"),
        ("mean_count", dict(mean=(0.5, 0.5)), ValueError, "mean has 2 values but video has 3 channels"),
        ("mean_matrix", dict(mean=torch.zeros(2, 3)), ValueError, "mean has 6 values"),
        ("mean_str", dict(mean="0.5"), TypeError, "mean must be a number, a sequence"),
        ("mean_none", dict(mean=None), TypeError, "mean must be a number, a sequence"),
        ("mean_mixed", dict(mean=[0.5, "x", 0.5]), TypeError, "mean must be"),
        ("mean_bool_tensor", dict(mean=torch.ones(3, dtype=torch.bool)), TypeError, "mean must be"),
        ("mean_requires_grad", dict(mean=torch.full((3,), 0.5, requires_grad=True)), ValueError,
         "mean is a tensor that requires grad"),
        ("std_zero", dict(std=(0.2, 0.0, 0.2)), ValueError, "std must be finite and non-zero"),
        ("std_zero_number", dict(std=0.0), ValueError, "std must be finite and non-zero"),
        ("std_nan", dict(std=float("nan")), ValueError, "std must be finite and non-zero"),
        ("std_inf_tensor", dict(std=torch.tensor([0.2, float("inf"), 0.2])), ValueError, "std must be finite"),
        ("hflip_int", dict(hflip=torch.tensor([1, 0] * (B // 2))), ValueError, "hflip must be a bool tensor"),
        ("hflip_length", dict(hflip=torch.ones(B + 1, dtype=torch.bool)), ValueError, "hflip must be a bool tensor"),
        ("hflip_list", dict(hflip=[True] * B), ValueError, "hflip must be a bool tensor"),
        ("hflip_2d", dict(hflip=torch.ones(B, 1, dtype=torch.bool)), ValueError, "hflip must be a bool tensor"),
        ("out_dtype_int", dict(out_dtype=torch.int32), TypeError, "out_dtype must be one of"),
        ("out_dtype_str", dict(out_dtype="float32"), TypeError, "out_dtype must be one of"),
        ("backend_unknown", dict(backend="tpu"), K.BackendUnavailable, "unknown backend 'tpu'"),
    ]


BAD_IDS = [c[0] for c in _bad_cases(torch.zeros(2, 5, 4, 4, 3, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.long))]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_inputs_name_the_problem(backend, case, gen, monkeypatch):
    """Every malformed argument: an exception naming it, the same from every backend, raised before any
    kernel runs (the backend's kernel is replaced by one that fails the test; only the compiled ops
    check the index range themselves, before their kernel)."""
    video, index, _ = make(2, 5, 4, 4, 3, 3, gen, flip=False)
    _, overrides, exc, msg = next(c for c in _bad_cases(video, index) if c[0] == case)
    if not (exc is IndexError and backend == "cpu"):
        def kernel(*args):
            raise AssertionError("a kernel ran on malformed input")
        monkeypatch.setitem(PF._IMPLS, backend, OpImpl(kernel))
    kwargs = {"video": video, "frame_index": index, "mean": MEAN, "std": STD, "backend": backend, **overrides}
    with pytest.raises(exc, match=msg):
        K.permute_frames(**kwargs)


def test_compiled_op_checks_inputs_itself(gen):
    """The C++ op validates too (callers of torch.ops.dualvar.* skip the Python checks)."""
    video, index, _ = make(2, 5, 4, 4, 3, 3, gen, flip=False)
    lut = K.normalization_lut(MEAN, STD, torch.float32, video.device)
    with pytest.raises(IndexError, match=r"\[10, \d+\], outside \[0, 5\)"):
        torch.ops.dualvar.permute_frames(video, index + 10, lut, None)
    with pytest.raises(RuntimeError, match="lut must be"):
        torch.ops.dualvar.permute_frames(video, index, lut[:2], None)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("flip", [False, True])
def test_gpu_backends_equal_reference(backend, out_dtype, flip, gen):
    video, index, hflip = make(3, 7, 13, 17, 3, 5, gen, flip)
    video, index, hflip = video.cuda(), index.cuda(), hflip.cuda() if flip else None
    # The reference on the same device: CUDA's x / 255 is x * (1/255), 1 ulp from the CPU's division
    # in a third of the float32 table entries; the kernels' table is built on the device too.
    ref = K.permute_frames_reference(video, index, MEAN, STD, out_dtype=out_dtype, hflip=hflip)
    out = K.permute_frames(video, index, MEAN, STD, out_dtype=out_dtype, hflip=hflip, backend=backend)
    assert K.last_backend("permute_frames") == backend
    assert torch.equal(out, ref)


@needs_gpu
@pytest.mark.gpu
def test_gpu_compiled_op_checks_index_range(gen):
    """An out-of-range index through torch.ops is an IndexError, not an illegal address that would
    break the CUDA context for the rest of the process."""
    video, index, _ = make(2, 5, 4, 4, 3, 3, gen, flip=False)
    video, index = video.cuda(), index.cuda()
    lut = K.normalization_lut(MEAN, STD, torch.float32, video.device)
    with pytest.raises(IndexError, match=r"outside \[0, 5\)"):
        torch.ops.dualvar.permute_frames(video, index + 10, lut, None)
    ref = K.permute_frames_reference(video, index, MEAN, STD)
    assert torch.equal(torch.ops.dualvar.permute_frames(video, index, lut, None), ref)


def test_explicit_gpu_backend_on_cpu_tensors_raises(gen):
    video, index, _ = make(1, 2, 2, 2, 3, 2, gen, flip=False)
    with pytest.raises(K.BackendUnavailable, match="needs CUDA tensors"):
        K.permute_frames(video, index, MEAN, STD, backend="cuda")


def test_compiled_op_passes_opcheck(gen):
    """Schema, fake (meta) function and dispatcher registration agree (torch.library.opcheck)."""
    video = torch.randint(0, 256, (2, 4, 3, 5, 3), dtype=torch.uint8, generator=gen)
    lut = K.normalization_lut((0.5,) * 3, (0.2,) * 3, torch.bfloat16, "cpu")
    hflip = torch.tensor([True, False])
    for flip in (None, hflip):
        torch.library.opcheck(torch.ops.dualvar.permute_frames.default, (video, K.identity_index(2, 4), lut, flip))


# ---------------------------------------------------------------- ahead-of-time compilation
AOT_CASES = [(arch, dtype, C, flip) for arch in (80, 90) for dtype in ("float32", "bfloat16", "float16")
             for C, flip in ((3, True), (3, False), (1, True))]


def _aot_spec(arch, dtype, C, flip):
    """The launcher itself, on the shapes of a training batch (16 clips of 16 224x224 frames), so the kernel
    compiles with the runtime's hints (aligned pointers, strides divisible by 16)."""
    B, T, H, W = 16, 16, 224, 224
    return {"launcher": "dualvar.kernels.permute_frames_triton:forward", "arch": arch,
            "args": [{"zeros": [B, T, H, W, C], "dtype": "uint8"}, {"zeros": [B, T], "dtype": "int64"},
                     {"zeros": [C, 256], "dtype": dtype}, None, None, None,
                     {"zeros": [B], "dtype": "bool"} if flip else None]}


@pytest.fixture(scope="module")
def aot_reports():
    return dict(zip(AOT_CASES, _aot.compile_launchers([_aot_spec(*c) for c in AOT_CASES])))


@pytest.mark.slow
@pytest.mark.parametrize("arch,dtype,C,flip", AOT_CASES)
def test_triton_kernel_compiles_for_gpu(aot_reports, arch, dtype, C, flip):
    (rep,) = aot_reports[(arch, dtype, C, flip)]  # one launch per call
    assert rep.name == "_permute_frames_kernel" and rep.arch == arch
    assert rep.hints > 0, "compiled without the runtime's divisibility hints"
    assert rep.within_limits(), rep
    assert rep.spill_stores == 0 and rep.spill_loads == 0, rep


# ---------------------------------------------------------------------------- GPU checks
@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_strided_inputs_equal_contiguous(backend, gen):
    for name, video, index, hflip in strided_cases(gen, "cuda"):
        contiguous = [t if t is None else t.contiguous() for t in (video, index, hflip)]
        ref = K.permute_frames_reference(contiguous[0], contiguous[1], MEAN, STD, hflip=contiguous[2])
        out = K.permute_frames(video, index, MEAN, STD, hflip=hflip, backend=backend)
        assert K.last_backend("permute_frames") == backend
        assert torch.equal(out, ref), name


@needs_two_gpus
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_tensors_off_the_current_device(backend, gen):
    """Inputs on cuda:1 while cuda:0 is current: the launch must go to cuda:1 (a device guard)."""
    video, index, hflip = make(3, 7, 13, 17, 3, 5, gen)
    video, index, hflip = video.to("cuda:1"), index.to("cuda:1"), hflip.to("cuda:1")
    with torch.cuda.device(0):
        out = K.permute_frames(video, index, MEAN, STD, hflip=hflip, backend=backend)
        ref = K.permute_frames_reference(video, index, MEAN, STD, hflip=hflip)
    torch.cuda.synchronize(1)
    assert out.device == video.device and torch.equal(out, ref)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_output_past_int32_offsets(backend, gen):
    """One sample whose channel plane T'*H*W passes 2^30: channel 2 starts past 2^31 elements (6.4 GB of
    bf16 output). Frames at the start and the end of every channel are checked against the reference."""
    T_out, H, W = 1025, 1024, 1024
    if torch.cuda.get_device_properties(0).total_memory < 16 * 2**30:
        pytest.skip("needs 16 GB of GPU memory")
    video = torch.randint(0, 256, (1, 2, H, W, 3), dtype=torch.uint8, generator=gen).cuda()
    index = torch.randint(0, 2, (1, T_out), generator=gen).cuda()
    hflip = torch.tensor([True], device="cuda")
    out = K.permute_frames(video, index, MEAN, STD, out_dtype=torch.bfloat16, hflip=hflip, backend=backend)
    assert 2 * T_out * H * W > 2**31
    for t in (0, 1, T_out // 2, T_out - 2, T_out - 1):
        ref = K.permute_frames_reference(video, index[:, t:t + 1], MEAN, STD, out_dtype=torch.bfloat16, hflip=hflip)
        assert torch.equal(out[:, :, t:t + 1], ref), t
    del out
    torch.cuda.empty_cache()


def test_random_segment_permutation_uniform_and_valid():
    g = torch.Generator().manual_seed(7)
    for s in (2, 3):
        perm = K.random_segment_permutation(6000, s, generator=g)
        assert perm.dtype == torch.int64 and perm.shape == (6000, s)
        assert torch.equal(perm.sort(1).values, torch.arange(s).expand(6000, s))
        rows, counts = torch.unique(perm, dim=0, return_counts=True)
        n = math.factorial(s)
        assert len(rows) == n
        expected = 6000 / n
        chi2 = float(((counts.double() - expected) ** 2 / expected).sum())
        assert chi2 < {2: 10.8, 3: 20.5}[s]  # p = 0.001 quantiles of chi-square with n - 1 dof
    # identity allowed by default (reference behaviour): about half the rows for s = 2
    ident = (K.random_segment_permutation(4000, 2, generator=g) == torch.arange(2)).all(1).double().mean()
    assert 0.45 < float(ident) < 0.55


@pytest.mark.parametrize("s", [2, 3, 5])
def test_derangement_has_no_fixed_points(s):
    g = torch.Generator().manual_seed(3)
    perm = K.random_segment_permutation(3000, s, generator=g, derangement=True)
    assert not bool((perm == torch.arange(s)).any())
    assert torch.equal(perm.sort(1).values, torch.arange(s).expand(3000, s))
    if s == 3:  # both 3-cycles, evenly
        assert len(torch.unique(perm, dim=0)) == 2
    with pytest.raises(ValueError):  # one segment has no derangement
        K.random_segment_permutation(3, 1, derangement=True)


def test_ranks_draw_different_permutations():
    """The reference seeded numpy identically on every rank, so all ranks drew the same permutations.
    Generators seeded per rank must not."""
    base_seed = 1234
    per_rank = [K.random_segment_permutation(64, 2, generator=torch.Generator().manual_seed(base_seed + rank))
                for rank in range(4)]
    for p, q in itertools.combinations(per_rank, 2):
        assert not torch.equal(p, q)
    # and successive steps on one rank differ too
    g = torch.Generator().manual_seed(base_seed)
    draw = lambda s, generator: K.random_segment_permutation(64, s, generator=generator)
    assert not torch.equal(draw(3, g), draw(3, g))
    # same seed -> same draws (reproducible)
    assert torch.equal(per_rank[0], draw(2, torch.Generator().manual_seed(base_seed)))
