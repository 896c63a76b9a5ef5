"""kernels/distributed.py and cross-rank NT-Xent with 2 gloo processes: local rows against all ranks' columns.

Choice (a) (default): the gather's backward sums column gradients to their owner, so after DDP's
averaging the gradient equals the single-process gradient of the global batch.
Choice (b) (reference_ddp=True): gradients other ranks send to this rank's rows as columns are dropped.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import dualvar.kernels as K
from dualvar.kernels import distributed as D_

W, B, D, TAU = 2, 5, 12, 0.1


def global_batch():
    g = torch.Generator().manual_seed(7)
    return F.normalize(torch.randn(W, 2 * B, D, generator=g, dtype=torch.float64), dim=-1)  # rank-major


def _worker(rank, init_file, backend, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    try:
        z_all = global_batch()
        out = {}
        for mode in ("exact", "reference"):
            z = z_all[rank].clone().requires_grad_()
            loss = K.nt_xent_loss(z, TAU, distributed=True, reference_ddp=mode == "reference", backend=backend)
            loss.backward()
            out[mode] = (loss.detach(), z.grad.clone())
        # the helpers themselves: rank order, exact and local gradients, the no-grad gather
        x = torch.arange(3.0, dtype=torch.float64).view(3, 1).add(10 * rank).requires_grad_()
        g = D_.gather_rows(x)
        weights = torch.arange(1.0, 7.0, dtype=torch.float64).view(6, 1) * (rank + 1)  # rank r weighs rows by r+1
        (g * weights).sum().backward()
        exact = x.grad.clone()
        x.grad = None
        (D_.gather_rows(x, local_grad_only=True) * weights).sum().backward()
        out["helpers"] = dict(rank=D_.rank(), world=D_.world_size(), dist=D_.is_distributed(),
                              gathered=g.detach(), exact=exact, local=x.grad.clone(),
                              no_grad=D_.all_gather_no_grad(x * 2), no_grad_req=D_.all_gather_no_grad(x).requires_grad)
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_two_process_gradients_equal_single_process(backend, tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(str(tmp_path / "init"), backend, results), nprocs=W, join=True)
    z_all = global_batch()

    # Single process, same global batch in the usual view-major layout [view 0 of all clips; view 1].
    view_major = torch.cat([z_all[:, :B].reshape(-1, D), z_all[:, B:].reshape(-1, D)]).requires_grad_()
    ref = K.nt_xent_loss_reference(view_major, TAU)
    ref.backward()
    g = view_major.grad
    for r in range(W):
        loss, grad = results[r]["exact"]
        expected = torch.cat([g[r * B:(r + 1) * B], g[W * B + r * B:W * B + (r + 1) * B]])
        # DDP averages over W ranks: grad / W is what reaches the parameters.
        assert torch.allclose(grad / W, expected, atol=1e-12 if backend == "torch" else 1e-10)
    mean_loss = sum(results[r]["exact"][0] for r in range(W)) / W
    assert torch.allclose(mean_loss, ref.detach(), atol=1e-12)

    # (b): rank r's own loss, with other ranks' columns treated as constants.
    for r in range(W):
        z = z_all[r].clone().requires_grad_()
        cols = torch.cat([z if s == r else z_all[s] for s in range(W)])
        sim = z @ cols.t() / TAU
        sim[torch.arange(2 * B), r * 2 * B + torch.arange(2 * B)] = float("-inf")
        pos = (z * torch.cat([z[B:], z[:B]])).sum(1) / TAU
        (sim.logsumexp(1) - pos).mean().backward()
        assert torch.allclose(results[r]["reference"][1], z.grad, atol=1e-10)
        assert not torch.allclose(results[r]["reference"][1], results[r]["exact"][1])


    # the helpers: ranks in order, rows concatenated in rank order, gradients summed over ranks (exact)
    # or this rank's own only (local), and a detached gather
    for r in range(W):
        h = results[r]["helpers"]
        assert (h["rank"], h["world"], h["dist"]) == (r, W, True)
        assert h["gathered"].view(-1).tolist() == [0, 1, 2, 10, 11, 12]
        rows = torch.arange(1.0, 7.0, dtype=torch.float64).view(6, 1)[3 * r:3 * r + 3]
        assert torch.equal(h["exact"], rows * (1 + 2))  # rank 0 weighs by 1, rank 1 by 2: summed
        assert torch.equal(h["local"], rows * (r + 1))
        assert h["no_grad"].view(-1).tolist() == [0, 2, 4, 20, 22, 24] and not h["no_grad_req"]


def test_helpers_without_process_group():
    """One process, no process group: rank 0 of 1, and the gathers are the identity (the same tensor,
    with its gradient) or a detached view."""
    assert (D_.is_distributed(), D_.rank(), D_.world_size()) == (False, 0, 1)
    x = torch.randn(4, 3, requires_grad=True)
    assert D_.gather_rows(x) is x
    y = D_.all_gather_no_grad(x)
    assert not y.requires_grad and torch.equal(y, x.detach())
    with pytest.raises(ValueError, match="x must be a tensor with a row dimension"):
        D_.gather_rows(torch.tensor(1.0))
    assert K.gather_rows is D_.gather_rows and K.all_gather_no_grad is D_.all_gather_no_grad


def test_nothing_else_in_kernels_calls_torch_distributed():
    import pathlib
    root = pathlib.Path(D_.__file__).parent
    for path in root.glob("*.py"):
        if path.name != "distributed.py":
            text = path.read_text()
            assert "import torch.distributed" not in text and "torch.distributed." not in text, path.name


def test_distributed_without_process_group_raises():
    with pytest.raises(RuntimeError, match="process group"):
        K.nt_xent_loss(torch.randn(4, 3), distributed=True)
