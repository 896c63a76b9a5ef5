"""Checkpoints: atomic writes, keep-last-k, resume from the newest file that loads, RNG state round trip."""
import os
import random

import numpy as np
import pytest
import torch

from dualvar.engine.checkpoint import (CheckpointError, CheckpointManager, Counters, RNGState, atomic_save,
                                       list_checkpoints, newest_readable, read_checkpoint)


def _parts(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    return model, opt, sched


def _train_step(model, opt, sched, x):
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def _manager(folder, model, opt, sched, counters, keep=3, log=print):
    return CheckpointManager(str(folder), {"model": model, "optimizer": opt, "scheduler": sched,
                                           "trainer": counters}, keep=keep, log=log)


def test_save_resume_restores_every_part(tmp_path):
    model, opt, sched = _parts()
    counters = Counters(step=0, epoch=0)
    ckpt = _manager(tmp_path, model, opt, sched, counters)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    for step in range(1, 4):
        _train_step(model, opt, sched, x)
        counters.step = step
    ckpt.save(3)
    expect = {k: v.clone() for k, v in model.state_dict().items()}
    _train_step(model, opt, sched, x)
    after_one_more = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2, sched2 = _parts(seed=5)
    counters2 = Counters(step=0, epoch=0)
    assert _manager(tmp_path, model2, opt2, sched2, counters2).resume("auto") == 3
    assert counters2.step == 3
    for k, v in expect.items():
        assert torch.equal(model2.state_dict()[k], v), k
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    _train_step(model2, opt2, sched2, x)  # momentum buffers came back too: the next step is identical
    for k, v in after_one_more.items():
        assert torch.equal(model2.state_dict()[k], v), k


def test_keeps_last_k_and_no_temp_files(tmp_path):
    model, opt, sched = _parts()
    ckpt = _manager(tmp_path, model, opt, sched, Counters(step=0), keep=2)
    for step in (10, 20, 30, 40):
        ckpt.save(step)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [40, 30]
    assert sorted(os.listdir(tmp_path)) == ["step-000000030.pt", "step-000000040.pt"]


def test_truncated_newest_is_reported_and_previous_used(tmp_path):
    model, opt, sched = _parts()
    counters = Counters(step=0)
    ckpt = _manager(tmp_path, model, opt, sched, counters)
    counters.step = 1
    ckpt.save(1)
    w1 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    counters.step = 2
    path2 = ckpt.save(2)
    size = os.path.getsize(path2)
    with open(path2, "r+b") as f:  # a write cut short on disk
        f.truncate(size // 2)
    messages = []
    model2, opt2, sched2 = _parts(seed=3)
    counters2 = Counters(step=0)
    assert _manager(tmp_path, model2, opt2, sched2, counters2, log=messages.append).resume("auto") == 1
    assert counters2.step == 1 and torch.equal(model2[0].weight, w1)
    assert any(path2 in m and "does not load" in m and "previous" in m for m in messages), messages


def test_corrupt_and_foreign_files_are_skipped(tmp_path):
    model, opt, sched = _parts()
    ckpt = _manager(tmp_path, model, opt, sched, Counters(step=0))
    ckpt.save(5)
    with open(tmp_path / "step-000000007.pt", "wb") as f:
        f.write(os.urandom(300))
    torch.save({"not": "ours"}, tmp_path / "step-000000009.pt")
    messages = []
    path, content = newest_readable(str(tmp_path), messages.append)
    assert path.endswith("step-000000005.pt") and content["step"] == 5
    assert len(messages) == 2


def test_nothing_to_resume(tmp_path):
    model, opt, sched = _parts()
    assert _manager(tmp_path / "empty", model, opt, sched, Counters(step=0)).resume("auto") is None
    assert _manager(tmp_path / "empty", model, opt, sched, Counters(step=0)).resume("none") is None


def test_crash_while_writing_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "step-000000001.pt")
    atomic_save({"format": 1, "step": 1, "meta": {}, "parts": {}}, path)

    class Explodes:
        def __reduce__(self):
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_save({"format": 1, "step": 2, "parts": {"x": Explodes()}}, path)
    assert read_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["step-000000001.pt"]


def test_stale_temp_files_are_removed(tmp_path):
    (tmp_path / ".step-000000004.pt.tmp-123").write_bytes(b"partial")
    model, opt, sched = _parts()
    _manager(tmp_path, model, opt, sched, Counters(step=0))
    assert os.listdir(tmp_path) == []


def test_missing_part_is_named(tmp_path):
    model, opt, sched = _parts()
    CheckpointManager(str(tmp_path), {"model": model}).save(1)
    with pytest.raises(CheckpointError, match="no state for optimizer"):
        _manager(tmp_path, model, opt, sched, Counters(step=0)).resume("auto")


def test_rng_state_round_trip(tmp_path):
    g = torch.Generator().manual_seed(7)
    rng = RNGState({"views": g})
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's legacy state
    ckpt = CheckpointManager(str(tmp_path), {"rng": rng})
    ckpt.save(1)

    def draw():
        return (random.random(), np.random.normal(), np.random.rand(3).tolist(), torch.rand(3).tolist(),
                torch.randperm(10, generator=g).tolist())

    first = draw()
    draw()
    assert CheckpointManager(str(tmp_path), {"rng": rng}).resume("auto") == 1
    assert draw() == first


def test_files_load_with_weights_only(tmp_path):
    model, opt, sched = _parts()
    ckpt = CheckpointManager(str(tmp_path), {"model": model, "optimizer": opt, "scheduler": sched,
                                             "rng": RNGState({"g": torch.Generator()}), "trainer": Counters(step=3)},
                             meta={"config": {"optim": {"lr": 0.1, "milestones": [1, 2]}, "loss": {"cap": None}}})
    path = ckpt.save(3)
    content = torch.load(path, weights_only=True)
    assert content["step"] == 3 and content["meta"]["config"]["optim"]["milestones"] == [1, 2]
