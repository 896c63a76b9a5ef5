"""Clip sampling against literal transcriptions of docs/method.md §1.2, §5.2 and §6.2."""
import math

import numpy as np
import pytest

from dualvar.engine.data.sampling import clip_indices, eval_indices, finetune_indices, pretrain_indices


def naive_clip(c, L, T, ds):
    return [min(max(c + (k - T // 2) * ds, 0), L - 1) for k in range(T)]


@pytest.mark.parametrize("L", [1, 2, 7, 61, 64, 300])
@pytest.mark.parametrize("T,ds", [(16, 4), (8, 2), (5, 3)])
def test_pretrain_indices_match_formula(L, T, ds):
    for seed in range(20):
        rng = np.random.default_rng(seed)
        idx, rev = pretrain_indices(L, rng, T, ds)
        # replay the same draws: c1, c2 then the reversal decision
        r = np.random.default_rng(seed)
        c1, c2 = r.integers(0, L, size=2)
        want_rev = r.random() < 0.5
        a, b = naive_clip(int(c1), L, T, ds), naive_clip(int(c2), L, T, ds)
        if want_rev:
            a, b = a[::-1], b[::-1]
        assert rev == want_rev
        assert idx.shape == (3, T) and idx.dtype == np.int64
        assert idx[0].tolist() == a and idx[1].tolist() == b and idx[2].tolist() == a


def test_pretrain_centres_uniform_and_reversal_half():
    L, n = 5, 4000
    rng = np.random.default_rng(0)
    centres, revs = [], []
    for _ in range(n):
        idx, rev = pretrain_indices(L, rng, frames=2, stride=1)
        # with T=2, ds=1 the second frame is the centre (k=1 -> offset 0), or the first when reversed
        centres.append(idx[0][0] if rev else idx[0][1])
        revs.append(rev)
    counts = np.bincount(centres, minlength=L)
    assert np.all(np.abs(counts / n - 1 / L) < 0.03)
    assert abs(np.mean(revs) - 0.5) < 0.03


def test_clip_indices_edges_repeat():
    assert clip_indices(0, 10, 4, 3).tolist() == [0, 0, 0, 3]
    assert clip_indices(9, 10, 4, 3).tolist() == [3, 6, 9, 9]


def naive_eval(L, T, ds, n):
    """The reference's loop with its constant 16 read as the clip length T (16 in every paper script)."""
    lo = min(T, L)
    hi = max(lo, L - T)
    out = []
    for i in range(n):
        centre = lo + (hi - lo) * i / (n - 1) if n > 1 else lo
        start = max(0, math.floor(centre - T))
        out.append([min(start + ds * k, L - 1) for k in range(T)])
    return out


@pytest.mark.parametrize("L", [1, 3, 16, 17, 33, 100, 257])
@pytest.mark.parametrize("T,ds,n", [(16, 2, 10), (16, 4, 10), (7, 3, 4)])
def test_eval_indices_match_formula(L, T, ds, n):
    got = eval_indices(L, T, ds, n)
    assert got.shape == (n, T)
    assert got.tolist() == naive_eval(L, T, ds, n)


@pytest.mark.parametrize("L", [33, 34, 100])
def test_finetune_uniform_start_range(L):
    T, ds = 16, 2
    rng = np.random.default_rng(1)
    starts = set()
    for _ in range(400):
        idx = finetune_indices(L, rng, T, ds)
        assert np.all(np.diff(idx) == ds)
        starts.add(int(idx[0]))
    assert min(starts) == 0 and max(starts) == L - 1 - (T - 1) * ds
    assert len(starts) == L - (T - 1) * ds


@pytest.mark.parametrize("L", [1, 5, 20, 30])
def test_finetune_short_video_pads_first_or_last(L):
    T, ds = 16, 2
    own = list(range(0, L, ds))[:T]
    pad = T - len(own)
    seen = set()
    rng = np.random.default_rng(3)
    for _ in range(50):
        idx = finetune_indices(L, rng, T, ds).tolist()
        assert idx in (own + [own[-1]] * pad, [own[0]] * pad + own)
        seen.add(tuple(idx))
    assert len(seen) == (1 if L == 1 else 2)


def test_bad_length_raises():
    with pytest.raises(ValueError, match="length"):
        pretrain_indices(0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="length"):
        eval_indices(0)
