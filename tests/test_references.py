"""The naive references against literal loop transcriptions of METHOD.md, and their gradients."""
import math

import pytest
import torch

import dualvar.kernels as K


def nt_xent_loop(z, tau, n_views):
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


def shuffle_rank_loop(anchor, shuffled, perm, theta, cap, weight):
    B, s, _ = anchor.shape
    terms = []
    for b in range(B):
        p = [None] * s
        for j in range(s):  # the reference's scatter: out[perm[j]] = normalize(y[j])
            p[int(perm[b, j])] = shuffled[b, j] / shuffled[b, j].norm()
        X = [anchor[b, i] for i in range(s)] + p
        for i in range(2 * s):
            c = i + s if i < s else i - s
            for j in range(2 * s):
                if j in (i, c):
                    continue
                x = min(float(X[i] @ X[j] - X[i] @ X[c]) / theta, cap)
                terms.append(math.log1p(math.exp(x)))
    return weight * sum(terms) / len(terms)


def unit(*shape, gen):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("n_views,N,D", [(2, 5, 7), (3, 4, 3), (2, 1, 4)])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_nt_xent_reference(n_views, N, D, tau, gen):
    z = unit(n_views * N, D, gen=gen)
    assert K.nt_xent_loss_reference(z, tau, n_views=n_views).item() == pytest.approx(nt_xent_loop(z, tau, n_views), rel=1e-10)


@pytest.mark.parametrize("with_queue", [False, True])
def test_info_nce_reference(with_queue, gen):
    q, k = unit(6, 5, gen=gen), unit(6, 5, gen=gen)
    queue = unit(9, 5, gen=gen) if with_queue else None
    got = K.info_nce_loss_reference(q, k, queue, 0.1).item()
    assert got == pytest.approx(info_nce_loop(q, k, queue, 0.1), rel=1e-10)


@pytest.mark.parametrize("s", [2, 3])
@pytest.mark.parametrize("theta,cap", [(0.05, 5.0), (0.05, math.inf), (0.01, 5.0)])
def test_shuffle_rank_reference(s, theta, cap, gen):
    B, d = 4, 6
    anchor = unit(B, s, d, gen=gen)
    shuffled = torch.randn(B, s, d, generator=gen, dtype=torch.float64) * 3
    perm = torch.stack([torch.randperm(s, generator=gen) for _ in range(B)])
    got = K.shuffle_rank_loss_reference(anchor, shuffled, perm, theta, cap=cap, weight=0.5).item()
    assert got == pytest.approx(shuffle_rank_loop(anchor, shuffled, perm, theta, cap, 0.5), rel=1e-10)


def test_reference_gradients(gen):
    z = unit(6, 4, gen=gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: K.nt_xent_loss_reference(x, 0.3, n_views=3), (z,))
    q, k = (unit(4, 3, gen=gen).requires_grad_() for _ in range(2))
    queue = unit(5, 3, gen=gen)  # the queue never receives a gradient
    assert torch.autograd.gradcheck(lambda a, b: K.info_nce_loss_reference(a, b, queue, 0.2), (q, k))
    anchor = unit(3, 3, 5, gen=gen).requires_grad_()
    shuffled = torch.randn(3, 3, 5, generator=gen, dtype=torch.float64).requires_grad_()
    perm = torch.stack([torch.randperm(3, generator=gen) for _ in range(3)])
    assert torch.autograd.gradcheck(lambda a, y: K.shuffle_rank_loss_reference(a, y, perm, 0.5, cap=5.0), (anchor, shuffled))
