"""Multi-process training on the CPU with gloo (docs/method.md §4): DDP against one process on the same global
batch, MoCo's batch-shuffle BN and identical queues, the reference weighting flag, and gradient caching under
DDP (one spawn of 2 processes runs every case); then whole runs under torchrun (dualvar.engine.cli pretrain):
SIGKILL mid-training and resume, a rank that meets unreadable videos, a rank that fails.

Gradients are compared per parameter as ||g_ddp - g_single|| / ||g_single|| (limit 1e-9, in float64 so
that float32 rounding, which differs between batch splits, does not blur the comparison). Backbones use
frozen-statistics BatchNorm or GroupNorm, whose per-sample normalisation makes a split batch exact; plain
BatchNorm in train mode differs by design (batch statistics per process), which the shuffle-BN case uses.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
import torch.distributed as tdist
import torch.multiprocessing as mp

from dualvar.engine import distributed as D
from dualvar.engine.frameworks import build_framework, make_views
from dualvar.engine.grad_cache import GradCache
from dualvar.engine.models import build_backbone
from dualvar.engine.objectives import DualVarLossConfig, build_objective
from helpers import tiny_run_config
from test_frameworks import make_batch

W, B = 2, 4  # processes, clips per process
QUEUE = 16
SHUFFLE_SEED = 5
# name: framework, norm, mode, grad-cache chunk, reference_ddp, key batch shuffle
CASES = {
    "simclr": ("simclr", "frozen_bn", "clip-sr-tc", None, False, False),
    "moco": ("moco", "frozen_bn", "clip-sr-tc", None, False, True),
    "simclr_gc": ("simclr", "group", "clip-sr-tc", 3, False, False),
    "moco_gc": ("moco", "frozen_bn", "clip-sr-tc", 3, False, True),
    "simclr_reference": ("simclr", "frozen_bn", "baseline", None, True, False),
}


def build(framework, norm, mode):
    torch.manual_seed(0)
    model = build_framework(framework, build_backbone("tiny", norm=norm), mode=mode, momentum=0.9).train().double()
    if framework == "moco":  # a key encoder that differs from the query encoder, so the EMA step shows
        with torch.no_grad():
            for p in model._key_params():
                p.add_(torch.randn_like(p), alpha=0.05)
    return model


def objective(framework, mode, distributed, reference_ddp=False):
    cfg = DualVarLossConfig(framework=framework, mode=mode, distributed=distributed, reference_ddp=reference_ddp)
    return build_objective(cfg, queue_size=QUEUE, generator=torch.Generator().manual_seed(1)).double()


def global_inputs():
    views, perm = make_views(make_batch(B=W * B, T=8, H=16, W=16, seed=4), "cpu", n_series=2,
                             generator=torch.Generator().manual_seed(3), out_dtype=torch.float64)
    return views, perm


def train_step(model, obj, views, perm, chunk=None):
    """One step's loss, parameter gradients and objective state (queues) after its update."""
    if chunk is None:
        emb = model(views, perm)
        out = obj(emb)
        out.total.backward()
    else:
        gc = GradCache(model, chunk)
        emb = gc.embed(views.shape[0], lambda lo, hi: (views[lo:hi], perm[lo:hi]))
        out = obj(emb)
        out.total.backward()
        gc.backward(emb)
    obj.update(emb)
    inner = D.unwrap(model)
    grads = {k: p.grad.detach().clone() for k, p in inner.named_parameters() if p.grad is not None}
    return out.total.detach(), grads, {k: v.clone() for k, v in obj.state_dict().items()}


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    try:
        views, perm = global_inputs()
        mine = slice(rank * B, (rank + 1) * B)
        results = {}
        for name, (fw, norm, mode, chunk, ref, shuffle) in CASES.items():
            inner = build(fw, norm, mode)
            if shuffle:
                inner.key_shuffle = D.BatchShuffle(torch.Generator().manual_seed(SHUFFLE_SEED))
            model = D.wrap_ddp(inner, torch.device("cpu"))
            results[name] = train_step(model, objective(fw, mode, True, ref), views[mine], perm[mine], chunk)
        # batch-shuffle BN with train-mode BatchNorm: this rank's keys
        inner = build("moco", "bn", "baseline")
        inner.key_shuffle = D.BatchShuffle(torch.Generator().manual_seed(SHUFFLE_SEED))
        results["shuffle_keys"] = D.wrap_ddp(inner, torch.device("cpu"))(views[mine], perm[mine]).z1.detach()
        results["helpers"] = dict(rank=D.rank(), world=D.world_size(), main=D.is_main(),
                                  mean=D.all_reduce(torch.tensor([1.0 + rank]), "mean"),
                                  objects=D.all_gather_object(("r", rank)), bcast=D.broadcast_object(rank * 10))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=W, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(W)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel_errors(got: dict, ref: dict) -> dict:
    assert got.keys() == ref.keys()
    return {k: float((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)) for k in ref}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_process(ddp_results, case):
    fw, norm, mode, chunk, ref, _ = CASES[case]
    views, perm = global_inputs()
    loss, grads, state = train_step(build(fw, norm, mode), objective(fw, mode, False), views, perm)
    if ref:  # the reference weighting: the clip loss's gradient is 1/W of the global one (docs/method.md §4(b))
        grads = {k: g / W for k, g in grads.items()}
    for r in range(W):
        r_loss, r_grads, r_state = ddp_results[r][case]
        # DDP averaged the gradients: every rank holds the same ones, equal to the single process's
        errs = rel_errors(r_grads, grads)
        assert max(errs.values()) < 1e-9, (case, r, sorted(errs.items(), key=lambda kv: -kv[1])[:3])
        for k in state:  # MoCo: every rank's queues equal the single process's (keys gathered in rank order)
            torch.testing.assert_close(r_state[k], state[k], rtol=0, atol=1e-12, msg=f"{case} rank {r}: {k}")
    # the logged loss is the mean of the ranks' local losses
    torch.testing.assert_close(sum(ddp_results[r][case][0] for r in range(W)) / W, loss, rtol=1e-12, atol=0)
    if fw == "moco":
        assert int(state["clip_queue.ptr"]) == W * B


def test_batch_shuffle_bn_mixes_ranks(ddp_results):
    """MoCo keys with batch-shuffle BN: each rank's key BatchNorm saw a random mix of every rank's clips;
    emulated in one process with the same permutation and per-rank BatchNorm batches."""
    views, perm = global_inputs()
    model = build("moco", "bn", "baseline")
    model.momentum_update()
    order = torch.randperm(W * B, generator=torch.Generator().manual_seed(SHUFFLE_SEED))
    x = views[:, 1][order]
    with torch.no_grad():
        h = torch.cat([model.key_backbone(x[r * B:(r + 1) * B]) for r in range(W)])[torch.argsort(order)]
        expected = model.key_clip_head(h)
        unshuffled = torch.cat([model.key_clip_head(model.key_backbone(views[r * B:(r + 1) * B, 1]))
                                for r in range(W)])
    got = torch.cat([ddp_results[r]["shuffle_keys"] for r in range(W)])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got, unshuffled, atol=1e-3)  # the shuffle changed the BatchNorm batches


def test_helpers_in_a_process_group(ddp_results):
    for r in range(W):
        h = ddp_results[r]["helpers"]
        assert (h["rank"], h["world"], h["main"]) == (r, W, r == 0)
        assert h["mean"].tolist() == [1.5] and h["objects"] == [("r", 0), ("r", 1)] and h["bcast"] == 0


def test_helpers_without_a_process_group(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    ctx = D.init_from_env("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed, ctx.backend) == (0, 1, True, False, None)
    assert not D.is_distributed() and D.world_size() == 1 and D.is_main()
    x = torch.randn(3, 2)
    assert D.all_reduce(x, "mean") is x and D.all_gather_object(1) == [1] and D.broadcast_object(2) == 2
    m = torch.nn.Linear(2, 2)
    assert D.wrap_ddp(m, torch.device("cpu")) is m and D.unwrap(m) is m
    shuffled, restore = D.BatchShuffle(torch.Generator())(x)
    assert shuffled is x and restore is None
    D.barrier()
    D.teardown()
    with pytest.raises(ValueError, match="device"):
        D.init_from_env("gpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "x")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        D.init_from_env("cpu")


def test_nothing_else_in_the_engine_calls_torch_distributed():
    import re
    call = re.compile(r"import torch\.distributed|from torch\.distributed|torch\.distributed\.\w+\(|"
                      r"=\s*torch\.distributed\b|DistributedDataParallel\(|SyncBatchNorm\.")
    # the sampler's defaults (rank and world size when none are passed) read torch.distributed; the
    # trainer always passes them
    allowed = {os.path.join("data", "dataset.py")}
    root = os.path.dirname(D.__file__)
    offenders = []
    for folder, _, files in os.walk(root):
        for f in files:
            path = os.path.join(folder, f)
            rel = os.path.relpath(path, root)
            if f.endswith(".py") and path != D.__file__ and rel not in allowed and call.search(open(path).read()):
                offenders.append(rel)
    assert not offenders, offenders


# ----------------------------------------------------------------------------- whole runs under torchrun
# 4 classes x 4 videos of 12 frames at 16x21 -> 12 training videos; global batch 4 = 2 clips on each of 2
# processes -> 6 samples and 3 steps per epoch per process.
LOSS_KEYS = ("clip_nce", "tc_nce", "sr_rank_view0", "sr_rank_view2", "sr_accuracy", "total", "lr", "grad_norm",
             "epoch")
RUN_TIMEOUT = 240  # seconds: a hang fails the test instead of the CI job


def run_config(root, **sections):
    return tiny_run_config(root, name="ddp", **sections)


def torchrun(tmp_path, cfg, run_dir, *extra, env=None, nproc=W):
    """`torchrun --standalone --nproc_per_node=W -m dualvar.engine.cli pretrain ...` as a subprocess."""
    from dualvar.engine.trainer import FAIL_ENV, KILL_ENV
    path = os.path.join(tmp_path, f"{os.path.basename(run_dir)}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    full_env = {k: v for k, v in os.environ.items() if k not in (KILL_ENV, FAIL_ENV)}
    full_env.update({"OMP_NUM_THREADS": "1", D.TIMEOUT_ENV: "120", **(env or {})})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "dualvar.engine.cli", "pretrain", "--config", path, "--run-dir", str(run_dir), *extra]
    return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc):
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the run did not end within {RUN_TIMEOUT} s (a hang):\n{out[-3000:]}") from None
    return proc.returncode, out


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from dualvar.engine.config import from_dict
    from dualvar.engine.trainer import ensure_synthetic
    root = str(tmp_path_factory.mktemp("synthetic") / "set")
    ensure_synthetic(from_dict(run_config(root)).data)  # generated once, before several processes want it
    return root


def test_runs_under_torchrun(tmp_path, synth_root):
    """Three jobs of 2 processes, started two and three at a time to share their start-up cost:
    1. MoCo (batch-shuffle BN) run uninterrupted, and 2. the same run SIGKILLed after step 5 (mid-epoch,
       a loader worker per process prefetching), then resumed with --resume auto: the resumed run's losses
       equal the uninterrupted run's step for step, and so do the final weights, queues and every rank's
       random generators;
    3. SimCLR with gradient caching where process 1's shard holds unreadable videos: it substitutes them and
       stays in step (every process ends, all optimizer steps done, the failures counted);
    4. a run whose process 1 raises after step 2: the whole job ends (no hang) with that error."""
    from dualvar.engine.checkpoint import list_checkpoints, read_checkpoint
    from dualvar.engine.config import from_dict
    from dualvar.engine.data.dataset import ResumableDistributedSampler
    from dualvar.engine.trainer import FAIL_ENV, KILL_ENV, training_entries

    moco = run_config(synth_root, model=dict(framework="moco", key_bn="shuffle"), data=dict(num_workers=1))
    full, cut = tmp_path / "full", tmp_path / "cut"
    procs = [torchrun(tmp_path, moco, full), torchrun(tmp_path, moco, cut, env={KILL_ENV: "5"})]
    (rc_full, log_full), (rc_cut, log_cut) = [finish(p) for p in procs]
    assert rc_full == 0, log_full
    assert rc_cut != 0, log_cut
    assert [r["step"] for r in read_metrics(cut)] == [1, 2, 3, 4, 5]
    assert [s for s, _ in list_checkpoints(os.path.join(cut, "checkpoints"))] == [4]

    # unreadable videos in process 1's first batches (a copy of the set, so the others keep theirs)
    bad_root = str(tmp_path / "bad_set")
    shutil.copytree(synth_root, bad_root)
    index = os.path.join(bad_root, "index_split1.jsonl")
    with open(index) as f:
        text = f.read()
    with open(index, "w") as f:
        f.write(text.replace(synth_root, bad_root))
    simclr = run_config(bad_root, model=dict(norm="frozen_bn"), train=dict(grad_cache_chunk=1, epochs=1))
    entries = training_entries(from_dict(simclr).data)
    shard1 = ResumableDistributedSampler(len(entries), W, 1, shuffle=True, seed=0).epoch_indices()
    for i in shard1[:2]:
        with open(entries[i]["path"], "wb") as f:
            f.write(b"not a video")
    failing = run_config(synth_root, train=dict(epochs=2))

    procs = [torchrun(tmp_path, moco, cut, "--resume", "auto"), torchrun(tmp_path, simclr, tmp_path / "bad"),
             torchrun(tmp_path, failing, tmp_path / "failing", env={FAIL_ENV: "1:2"})]
    (rc, log), (rc_bad, log_bad), (rc_fail, log_fail) = [finish(p) for p in procs]

    # 1-2: the resumed run is the uninterrupted run
    assert rc == 0, log
    assert "step-000000004.pt (step 4)" in log
    ref, got = read_metrics(full), read_metrics(cut)
    assert [r["step"] for r in ref] == list(range(1, 10)) == [r["step"] for r in got]
    for a, b in zip(ref, got):
        assert {k: a[k] for k in LOSS_KEYS} == {k: b[k] for k in LOSS_KEYS}, (a["step"], a, b)
    a = read_checkpoint(os.path.join(full, "checkpoints", "step-000000009.pt"))["parts"]
    b = read_checkpoint(os.path.join(cut, "checkpoints", "step-000000009.pt"))["parts"]
    for part in ("model", "objective"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["data"] == b["data"] and a["trainer"] == b["trainer"]
    assert len(a["rng"]["ranks"]) == W
    for ra, rb in zip(a["rng"]["ranks"], b["rng"]["ranks"]):
        assert torch.equal(ra["generators"]["views"], rb["generators"]["views"])
        assert torch.equal(ra["generators"]["key_shuffle"], rb["generators"]["key_shuffle"])
    assert not torch.equal(a["rng"]["ranks"][0]["generators"]["views"], a["rng"]["ranks"][1]["generators"]["views"])

    # 3: unreadable videos on process 1
    assert rc_bad == 0, log_bad
    summary = json.load(open(tmp_path / "bad" / "summary.json"))
    assert summary["steps"] == 3 and summary["processes"] == W and summary["grad_cache_chunk"] == 1, summary
    assert sum(summary["read_failures"].values()) >= 2, summary
    assert [r["step"] for r in read_metrics(tmp_path / "bad")] == [1, 2, 3]

    # 4: the failing process ends the job with its error
    assert rc_fail != 0, log_fail
    assert "deliberate failure of rank 1 after step 2" in log_fail, log_fail
    assert [r["step"] for r in read_metrics(tmp_path / "failing")][-1] <= 3
