"""permute_frames: reference vs a literal loop, every backend vs the reference, index maps, errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dualvar.kernels as K
from dualvar.kernels.info import thp_mode
from conftest import cpu_backends, needs_gpu

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


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "torch"])
def test_non_contiguous_video(backend, gen):
    base = torch.randint(0, 256, (2, 6, 9, 11, 3), dtype=torch.uint8, generator=gen)
    video = base[:, ::2]  # strided in time
    index = torch.randint(0, 3, (2, 4), generator=gen)
    ref = K.permute_frames_reference(video, index, MEAN, STD)
    assert torch.equal(K.permute_frames(video, index, MEAN, STD, backend=backend), ref)


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
from test_permute import _anon_huge_kib
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


def test_random_segment_permutation(gen):
    perm = K.random_segment_permutation(4000, 3, generator=gen)
    assert torch.equal(perm.sort(1).values, torch.arange(3).expand(4000, 3))
    counts = torch.unique(perm, dim=0, return_counts=True)[1]
    assert len(counts) == 6 and counts.min() > 550  # 6 permutations, ~667 each
    der = K.random_segment_permutation(500, 4, generator=gen, derangement=True)
    assert not bool((der == torch.arange(4)).any())
    with pytest.raises(ValueError):
        K.random_segment_permutation(3, 1, derangement=True)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bad_inputs_name_the_problem(backend, gen):
    video, index, _ = make(2, 5, 4, 4, 3, 3, gen, flip=False)
    run = lambda **kw: K.permute_frames(**{"video": video, "frame_index": index, "mean": MEAN, "std": STD,
                                           "backend": backend, **kw})
    with pytest.raises(TypeError, match="uint8"):
        run(video=video.float())
    with pytest.raises(ValueError, match="5-D"):
        run(video=video[0])
    with pytest.raises(ValueError, match="1 or 3 channels"):
        run(video=video.permute(0, 1, 4, 2, 3).contiguous())
    with pytest.raises(IndexError, match="5 frames"):
        run(frame_index=index + 5)
    with pytest.raises(IndexError, match=r"\[-\d+"):
        run(frame_index=index - 5)
    with pytest.raises(TypeError, match="int64"):
        run(frame_index=index.int())
    with pytest.raises(ValueError, match="frame_index must be"):
        run(frame_index=index[:1])
    with pytest.raises(ValueError, match="mean has 2 values"):
        run(mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="std must be finite and non-zero"):
        run(std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="hflip"):
        run(hflip=torch.tensor([1, 0]))
    with pytest.raises(TypeError, match="out_dtype"):
        run(out_dtype=torch.int32)


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
