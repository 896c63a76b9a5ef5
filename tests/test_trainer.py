"""The trainer on a CPU with the tiny backbone and a generated synthetic set at tiny size.

The resume test runs `python -m dualvar.engine.cli pretrain` as subprocesses: an uninterrupted run, and a run
that SIGKILLs itself in the middle of an epoch (trainer test hook DUALVAR_KILL_AT_STEP, while 2 loader workers
prefetch) and is then resumed with `--resume auto`; the resumed metrics.jsonl must equal the uninterrupted one
step for step, and the final checkpoints (weights, optimizer, MoCo queues, loader position) must be equal.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from torch import nn

from dualvar.engine.checkpoint import CheckpointManager, Counters, list_checkpoints, read_checkpoint
from dualvar.engine.config import from_dict, load_config
from dualvar.engine.trainer import KILL_ENV, NonFiniteLossError, Trainer, lr_factor
from helpers import one_thread, tiny_run_config  # noqa: F401  (one_thread: an autouse fixture)

LOSS_KEYS = ("clip_nce", "tc_nce", "sr_rank_view0", "sr_rank_view2", "sr_accuracy", "total", "lr", "grad_norm",
             "epoch")


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic") / "set")


def tiny_config(root: str, **sections) -> dict:
    return tiny_run_config(root, **sections)


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- schedules
def test_lr_schedules():
    sgd = load_config("ucf101_r21d_simclr_dualvar").optim  # x0.1 at 120 and 160, per epoch
    spe = 10
    assert lr_factor(sgd, 0, spe, 200) == 1.0
    assert lr_factor(sgd, 120 * spe - 1, spe, 200) == 1.0
    assert lr_factor(sgd, 120 * spe, spe, 200) == pytest.approx(0.1)
    assert lr_factor(sgd, 160 * spe, spe, 200) == pytest.approx(0.01)
    cos = from_dict({"data": {"index": "x"}, "optim": {"schedule": "cosine", "warmup_epochs": 2,
                                                      "min_lr_ratio": 0.1}}).optim
    ramp = [lr_factor(cos, s, spe, 12) for s in range(2 * spe)]
    assert ramp[0] == pytest.approx(1 / 20) and ramp[-1] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(ramp, ramp[1:]))
    assert lr_factor(cos, 7 * spe, spe, 12) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(cos, 12 * spe, spe, 12) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- steps on a fixed batch
@pytest.mark.parametrize("framework", ["simclr", "moco"])
def test_steps_lower_the_loss_on_a_fixed_batch(tmp_path, synth_root, framework):
    cfg = from_dict(tiny_config(synth_root, model=dict(framework=framework, momentum=0.9),
                                optim=dict(name="adamw", lr=3e-3, schedule="constant", weight_decay=0.0)))
    trainer = Trainer(cfg, str(tmp_path))
    trainer.loader.set_epoch(0)
    batch = next(iter(trainer.loader))
    gen_state = trainer.perm_generator.get_state()
    # MoCo: the queue is held fixed. Filled with this same batch's keys, it would hold copies of every
    # positive as negatives and bound the loss from below (log of the copies + 1).
    trainer.objective.update = lambda emb: None
    losses = []
    for _ in range(8):
        trainer.perm_generator.set_state(gen_state)  # the same views every step
        metrics = trainer.train_step(batch)
        assert "nonfinite" not in metrics
        losses.append(metrics["total"])
    assert trainer.counters.step == 8
    assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------- non-finite losses
class PoisonPart(nn.Module):
    """Wraps an objective: at the given (1-based) calls one loss part becomes NaN (and so the total)."""

    def __init__(self, inner, part, calls):
        super().__init__()
        self.inner, self.part, self.calls, self.n = inner, part, set(calls), 0

    def forward(self, emb):
        out = self.inner(emb)
        self.n += 1
        if self.n in self.calls:
            bad = getattr(out, self.part) * float("nan")
            out.total = out.total + bad
            setattr(out, self.part, bad)
        return out

    def update(self, emb):
        self.inner.update(emb)


def test_nonfinite_part_skips_the_step_and_is_named(tmp_path, synth_root):
    cfg = from_dict(tiny_config(synth_root, train=dict(epochs=1, max_nonfinite=2)))
    trainer = Trainer(cfg, str(tmp_path))
    trainer.objective = PoisonPart(trainer.objective, "tc_nce", calls=[2])
    before = {}

    def snapshot_at_step_2(batch, _orig=trainer.train_step):
        if trainer.counters.step == 1:
            before.update({k: v.clone() for k, v in trainer.framework.state_dict().items()})
        m = _orig(batch)
        if trainer.counters.step == 2:  # the skipped step changed no weight
            for k, v in trainer.framework.state_dict().items():
                assert torch.equal(v, before[k]) or "running" in k or "num_batches" in k, k
        return m

    trainer.train_step = snapshot_at_step_2
    summary = trainer.fit()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["nonfinite"] == "tc_nce" and rows[1]["tc_nce"] == "nan"
    assert "nonfinite" not in rows[0] and "nonfinite" not in rows[2]
    assert summary["nonfinite_steps"] == 1 and summary["steps"] == 3


def test_consecutive_nonfinite_losses_stop_the_run(tmp_path, synth_root, capsys):
    cfg = from_dict(tiny_config(synth_root, train=dict(epochs=3, max_nonfinite=2)))
    trainer = Trainer(cfg, str(tmp_path))
    trainer.objective = PoisonPart(trainer.objective, "sr_rank_view2", calls=[2, 3, 4, 5])
    with pytest.raises(NonFiniteLossError, match=r"stopping at step 3: sr_rank_view2 non-finite for 2 consecutive"):
        trainer.fit()
    assert [r.get("nonfinite") for r in read_metrics(tmp_path)] == [None, "sr_rank_view2", "sr_rank_view2"]
    assert "step 2: non-finite sr_rank_view2" in capsys.readouterr().err


# ----------------------------------------------------------------------------- run directory
def test_run_dir_holds_config_metrics_events_checkpoints(tmp_path, synth_root):
    cfg = from_dict(tiny_config(synth_root, train=dict(epochs=1, tensorboard=True, log_every=2)))
    summary = Trainer(cfg, str(tmp_path)).fit()
    assert load_config(str(tmp_path / "config.yaml")) == cfg
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 3]  # every 2nd step and the last
    row = read_metrics(tmp_path)[-1]
    for key in LOSS_KEYS + ("clips_per_s", "data_s", "step_s", "peak_mem_mb", "skipped_videos"):
        assert key in row, key
    assert row["peak_mem_mb"] > 0 and row["skipped_videos"] == 0
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    assert [s for s, _ in list_checkpoints(str(tmp_path / "checkpoints"))] == [3]
    assert json.load(open(tmp_path / "summary.json"))["steps"] == 3 == summary["steps"]
    results = json.load(open(tmp_path / "results.json"))  # the run's report, written at the end of fit
    assert results["pretrain"]["summary"]["steps"] == 3 and (tmp_path / "report.md").stat().st_size > 0
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- export
def test_export_round_trips_into_torchvision(tmp_path):
    from torchvision.models.video import r2plus1d_18

    from dualvar.engine.export import read_export
    from dualvar.engine.frameworks import build_framework
    from dualvar.engine.models import build_backbone
    torch.manual_seed(0)
    cfg = from_dict({"data": {"index": "x.jsonl"}, "model": {"backbone": "r2plus1d_18", "framework": "moco",
                                                             "mode": "clip-sr"}})
    framework = build_framework("moco", build_backbone("r2plus1d_18"), mode="clip-sr")
    with torch.no_grad():  # make the key encoder differ from the query: the export must take the query
        for p in framework.key_backbone.parameters():
            p.add_(1.0)
    CheckpointManager(str(tmp_path / "run" / "checkpoints"), {"model": framework, "trainer": Counters(step=7, epoch=1)},
                      meta={"config": cfg.to_dict(), "git_revision": "abc"}).save(7)
    out = str(tmp_path / "model.safetensors")
    from dualvar.engine.cli import main
    assert main(["export", str(tmp_path / "run"), "--out", out]) == 0
    state, meta = read_export(out)
    assert (meta["backbone"], meta["method"], meta["mode"], meta["step"], meta["epoch"]) == \
        ("r2plus1d_18", "moco", "clip-sr", "7", "1")
    assert (meta["frames"], meta["stride"], meta["size"], meta["git_revision"]) == ("16", "4", "112", "abc")
    assert json.loads(meta["mean"]) == [0.485, 0.456, 0.406] and len(json.loads(meta["std"])) == 3

    tv = r2plus1d_18(weights=None)
    missing, unexpected = tv.load_state_dict(state, strict=False)
    assert unexpected == [] and sorted(missing) == ["fc.bias", "fc.weight"]
    tv.fc = nn.Identity()
    tv.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 4, 32, 32)
    tv.eval(), framework.eval()
    with torch.no_grad():
        assert torch.equal(tv(x), framework.backbone(x))


# ----------------------------------------------------------------------------- exact resume
def _pretrain(cfg_path, run_dir, *extra, kill_at=None):
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    env["OMP_NUM_THREADS"] = "1"
    if kill_at:
        env[KILL_ENV] = str(kill_at)
    return subprocess.Popen([sys.executable, "-m", "dualvar.engine.cli", "pretrain", "--config", cfg_path, "--run-dir",
                             run_dir, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


@pytest.mark.parametrize("framework", ["simclr", "moco"])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, synth_root, framework):
    # Batch 2: 3 epochs x 6 steps, checkpoints at steps 7 and 14 and the end (18). The kill lands after step 8,
    # in the middle of epoch 1, while the 2 workers hold up to 4 prefetched batches (steps 9-12); the resume
    # starts from step 7 (also mid-epoch), redoes step 8 and crosses the epoch boundaries at 12 and 18.
    from dualvar.engine.trainer import ensure_synthetic
    cfg = tiny_config(synth_root, model=dict(framework=framework), data=dict(num_workers=2, batch_size=2),
                      checkpoint=dict(every_steps=7, keep=2))
    ensure_synthetic(from_dict(cfg).data)  # generated once, before two processes want it
    cfg_path = str(tmp_path / "cfg.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f)
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    procs = [_pretrain(cfg_path, full), _pretrain(cfg_path, cut, kill_at=8)]
    (rc_full, log_full), (rc_cut, log_cut) = [_finish(p) for p in procs]
    assert rc_full == 0, log_full
    assert rc_cut == -9, log_cut  # SIGKILL
    killed_rows = read_metrics(cut)
    assert [r["step"] for r in killed_rows] == list(range(1, 9))
    assert [s for s, _ in list_checkpoints(os.path.join(cut, "checkpoints"))] == [7]
    if framework == "moco":  # a newer checkpoint cut short on disk is reported and skipped
        good = os.path.join(cut, "checkpoints", "step-000000007.pt")
        with open(good, "rb") as f, open(os.path.join(cut, "checkpoints", "step-000000008.pt"), "wb") as g:
            g.write(f.read()[:2000])

    rc, log = _finish(_pretrain(cfg_path, cut, "--resume", "auto"))
    assert rc == 0, log
    assert "resumed from" in log and "step-000000007.pt (step 7)" in log
    if framework == "moco":
        assert "step-000000008.pt does not load" in log

    backends = [json.load(open(os.path.join(d, "summary.json")))["backends"] for d in (full, cut)]
    assert backends[0] == backends[1], f"the runs used different kernel backends (extension rebuilt?): {backends}"
    ref, got = read_metrics(full), read_metrics(cut)
    assert [r["step"] for r in ref] == list(range(1, 19)) == [r["step"] for r in got]
    for a, b in zip(ref, got):
        assert {k: a[k] for k in LOSS_KEYS} == {k: b[k] for k in LOSS_KEYS}, (a["step"], a, b)
    for a, b in zip(ref, killed_rows):  # the killed run's own steps, step 8 included
        assert {k: a[k] for k in LOSS_KEYS} == {k: b[k] for k in LOSS_KEYS}
    assert [r["epoch"] for r in ref] == [0] * 6 + [1] * 6 + [2] * 6
    assert not math.isclose(ref[0]["total"], ref[-1]["total"])

    a = read_checkpoint(os.path.join(full, "checkpoints", "step-000000018.pt"))["parts"]
    b = read_checkpoint(os.path.join(cut, "checkpoints", "step-000000018.pt"))["parts"]
    for part in ("model", "objective"):  # weights, BN statistics, key encoder, MoCo queues and pointers
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["data"] == b["data"] and a["trainer"] == b["trainer"]
    if framework == "moco":
        assert int(b["objective"]["clip_queue.ptr"]) == (18 * 2) % 16
