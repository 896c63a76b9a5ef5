"""Fine-tuning: presets, steps on a fixed batch, the ten-clip softmax average against a naive per-clip reference,
top-1/top-5 on hand-built scores, loading from a run directory and from an export, and a CLI smoke run with
resume, validation, results.json, report.md and plots (tiny backbone, tiny synthetic set, CPU)."""
import argparse
import json
import os

import numpy as np
import pytest
import torch

from dualvar.engine.config import ConfigError
from dualvar.engine.evaluate import finetune as ft
from dualvar.engine.evaluate.cli import add_finetune
from dualvar.engine.models import build_backbone
from helpers import one_thread  # noqa: F401  (one_thread: an autouse fixture)

# 4 classes x 4 videos of 40 frames at 16 x 21 -> 12 train (3 per class), 4 test videos
SYNTH = dict(synthetic_classes=4, synthetic_videos_per_class=4, synthetic_frames=40, synthetic_height=16,
             synthetic_width=21)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ftsynth") / "set")


def tiny_config(root: str, checkpoint: str = "random:tiny:0", **sections) -> dict:
    cfg = {
        "name": "ft_tiny",
        "data": dict(dataset="synthetic", root=root, holdout=0, frames=4, stride=2, crop=16, size=16, long=21,
                     batch_size=4, num_workers=0, **SYNTH),
        "model": dict(checkpoint=checkpoint),
        "optim": dict(name="sgd", lr=0.05, milestones=[1]),
        "train": dict(epochs=2, device="cpu", log_every=1, progress=False, tensorboard=False),
        "checkpoint": dict(every_steps=2, keep=2),
        "test": dict(clips=3, batch_size=2, num_workers=0),
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def tuner(root, run_dir, checkpoint="random:tiny:0", **sections):
    return ft.FineTuner(ft.finetune_config_from_dict(tiny_config(root, checkpoint, **sections)), str(run_dir))


# ----------------------------------------------------------------------------- config
def test_presets_hold_the_paper_schedules():
    names = set(ft.finetune_preset_names())
    assert {"ucf101_after_ucf101", "hmdb51_after_ucf101", "ucf101_after_k400", "hmdb51_after_k400",
            "synthetic"} <= names
    for name in names:
        ft.load_finetune_config(name, ["model.checkpoint=random:tiny"])
    for name, dataset, epochs, milestones in (("ucf101_after_ucf101", "ucf101", 100, (30, 60, 80)),
                                              ("hmdb51_after_ucf101", "hmdb51", 100, (30, 60, 80)),
                                              ("ucf101_after_k400", "ucf101", 150, (50, 100)),
                                              ("hmdb51_after_k400", "hmdb51", 150, (50, 100))):
        c = ft.load_finetune_config(name, ["model.checkpoint=runs/x"])
        assert (c.data.dataset, c.train.epochs, c.optim.milestones) == (dataset, epochs, milestones), name
        assert (c.optim.name, c.optim.lr, c.optim.momentum, c.optim.weight_decay, c.optim.gamma, c.optim.schedule) \
            == ("sgd", 0.05, 0.9, 1e-3, 0.1, "multistep")
        assert (c.data.batch_size, c.data.frames, c.data.stride, c.data.crop, c.data.size, c.data.long,
                c.data.holdout) == (16, 16, 2, 112, 128, 171, 800)
        assert (c.test.clips, c.test.stride, c.model.init_std) == (10, 2, 0.01)
        assert c.data.index_path() == f"data/{dataset}_split1.jsonl"
    c = ft.load_finetune_config("hmdb51_after_k400", ["model.checkpoint=runs/x", "data.split=3"])
    assert c.data.index_path() == "data/hmdb51_split3.jsonl"
    with pytest.raises(ConfigError, match="data.split"):
        ft.load_finetune_config("ucf101_after_ucf101", ["model.checkpoint=runs/x", "data.split=4"])
    with pytest.raises(ConfigError, match="model.checkpoint"):
        ft.load_finetune_config("ucf101_after_ucf101")
    with pytest.raises(ConfigError, match="unknown config key optim.lrr"):
        ft.load_finetune_config("ucf101_after_ucf101", ["model.checkpoint=runs/x", "optim.lrr=1"])


def test_missing_index_names_the_preparing_command(tmp_path):
    cfg = ft.load_finetune_config("ucf101_after_ucf101", ["model.checkpoint=random:tiny",
                                                          f"data.index={tmp_path}/ucf_split{{split}}.jsonl",
                                                          "data.split=2"])
    with pytest.raises(FileNotFoundError, match=r"ucf_split2\.jsonl.*dualvar data index --dataset ucf101 .*--split 2"):
        ft.FineTuner(cfg, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


# ----------------------------------------------------------------------------- test-time maths
def test_clip_average_softmax_matches_naive_reference():
    gen = torch.Generator().manual_seed(0)
    for B, V, C in ((3, 10, 7), (1, 1, 2), (5, 4, 101)):
        logits = torch.randn(B, V, C, generator=gen) * 6
        logits[0, 0, 0] = 80.0  # large logits: a naive exp would overflow in float16, not here
        got = ft.clip_average_softmax(logits)
        ref = torch.zeros(B, C, dtype=torch.float64)
        for b in range(B):
            for v in range(V):
                row = [float(x) for x in logits[b, v]]
                m = max(row)
                e = [np.exp(x - m) for x in row]
                ref[b] += torch.tensor([x / sum(e) for x in e], dtype=torch.float64) / V
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got.sum(1), torch.ones(B))
    # averaging probabilities is not averaging logits: a confident clip does not outvote the others
    logits = torch.tensor([[[20.0, 0, 0]] + [[0, 3.0, 0]] * 4])
    assert ft.clip_average_softmax(logits).argmax(1).item() == 1
    assert logits.mean(1).argmax(1).item() == 0
    with pytest.raises(ValueError, match="logits"):
        ft.clip_average_softmax(torch.zeros(3, 4))


def test_topk_accuracy_hand_built():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.0, 0.3],   # order 3 1 5 2 0 4
                           [0.3, 0.3, 0.3, 0.3, 0.3, 0.3],   # all tied: order 0 1 2 3 4 5
                           [0.9, 0.1, 0.1, 0.1, 0.1, 0.8],   # order 0 5 1 2 3 4
                           [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])  # order 2 0 1 3 4 5
    labels = torch.tensor([1, 5, 0, 5])
    # ranks of the labels: 2, 6, 1, 6
    acc = ft.topk_accuracy(scores, labels, (1, 2, 5, 6))
    assert acc == {1: 0.25, 2: 0.5, 5: 0.5, 6: 1.0}
    valid = torch.tensor([True, True, False, True])  # an unreadable video counts as wrong
    assert ft.topk_accuracy(scores, labels, (1, 2, 6), valid) == {1: 0.0, 2: 0.25, 6: 0.75}
    # fewer than 5 classes: top-5 means top-C
    three = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.3, 0.2]])
    assert ft.topk_accuracy(three, torch.tensor([0, 2]), (1, 5)) == {1: 0.0, 5: 1.0}
    pred = {"probs": scores, "labels": labels, "valid": valid, "clip_hits": 3, "clips": 12}
    res = ft.score_predictions(pred, 6)
    assert (res["top1"], res["top5"], res["top5_k"], res["without_feature"], res["clip_top1"]) == (0.0, 0.25, 5, 1,
                                                                                                    0.25)
    assert res["confusion"].sum() == 3 and res["confusion"][1, 3] == 1 and res["confusion"][5, 0] == 1
    nan = dict(pred, probs=scores.clone().index_fill_(1, torch.tensor([2]), float("nan")))
    res = ft.score_predictions(nan, 6)  # NaN in, NaN out
    assert res["nonfinite"] == 3 and res["top1"] != res["top1"] and res["top5"] != res["top5"]
    with pytest.raises(ValueError, match="labels"):
        ft.topk_accuracy(scores, labels[:3])


def test_ten_clip_prediction_equals_per_clip_reference(synth_root, tmp_path):
    """predict_videos (batched videos x clips, one forward) against one forward per clip, softmax, mean."""
    from dualvar.engine.data import IMAGENET_MEAN, IMAGENET_STD, centre_crop, eval_indices, open_video, to_views
    t = tuner(synth_root, tmp_path / "run")
    model = t.model.eval()
    torch.manual_seed(1)
    with torch.no_grad():  # distinct running statistics, so eval mode matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        model.fc.weight.normal_(0, 1.0)
    entries = t.test_entries[:3] + [{**t.test_entries[3], "path": str(tmp_path / "missing.avi"), "status": "missing"}]
    clips = ft.ClipVideos(entries, "test", frames=4, stride=2, clips=3, crop=16, size=16, long=21)
    pred = ft.predict_videos(model, clips, device=torch.device("cpu"), batch_size=2)
    assert pred["valid"].tolist() == [True, True, True, False] and pred["failures"]["missing"] == 1
    assert not model.training
    for row, e in enumerate(entries[:3]):
        reader = open_video(e["path"], height=16, width=21)
        idx = eval_indices(reader.num_frames, 4, 2, 3)
        assert len({tuple(i) for i in idx.tolist()}) == 3  # three different clips
        frames = reader.get_frames(idx.reshape(-1)).reshape(3, 4, 16, 21, 3)
        probs = []
        for v in range(3):
            clip = torch.from_numpy(centre_crop(frames[v], 16))[None, None]
            x = to_views({"video": clip}, "cpu", mean=IMAGENET_MEAN, std=IMAGENET_STD, augment_colour=False)[:, 0]
            with torch.no_grad():
                probs.append(torch.softmax(model(x).double(), 1)[0])
        torch.testing.assert_close(pred["probs"][row].double(), torch.stack(probs).mean(0), rtol=1e-4, atol=1e-6)
    assert torch.equal(pred["probs"][3], torch.zeros_like(pred["probs"][3]))


# ----------------------------------------------------------------------------- model and loading
def test_classifier_init_and_steps_lower_the_loss_on_a_fixed_batch(synth_root, tmp_path):
    t = tuner(synth_root, tmp_path / "run", optim=dict(name="adamw", lr=3e-3, schedule="constant", weight_decay=0.0))
    fc = t.model.fc
    assert fc.out_features == 4 and fc.in_features == t.model.backbone.feature_dim
    assert torch.equal(fc.bias, torch.zeros(4)) and 0.005 < float(fc.weight.detach().std()) < 0.02
    assert t.net is t.model  # one process: not wrapped
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.loader.set_epoch(0)
    batch = next(iter(t.loader))
    assert batch["video"].shape[1] == 1 and "hflip" in batch  # the data layer's finetune mode
    losses = []
    for _ in range(8):
        metrics = t.train_step(batch)
        assert "nonfinite" not in metrics
        losses.append(metrics["loss"])
    assert t.counters.step == 8
    assert losses[-1] < 0.5 * losses[0], losses
    after = t.model.state_dict()
    changed = [k for k, v in before.items() if v.is_floating_point() and not torch.equal(v, after[k])]
    assert any(k.startswith("backbone.layer1") for k in changed) and "fc.weight" in changed  # the whole network


def test_run_dir_and_export_load_the_same_query_backbone(synth_root, tmp_path):
    from dualvar.engine.checkpoint import CheckpointManager
    from dualvar.engine.config import from_dict
    from dualvar.engine.export import export_backbone
    from dualvar.engine.frameworks import build_framework
    config = from_dict({"name": "pre", "data": {"dataset": "synthetic", "frames": 4, "stride": 2, "crop": 16,
                                                "size": 16, "long": 21},
                        "model": {"backbone": "tiny", "framework": "moco"}})
    torch.manual_seed(5)
    fw = build_framework("moco", build_backbone("tiny"), mode="clip-sr-tc")
    with torch.no_grad():  # query and key encoders differ, so loading the wrong one is visible
        for p in fw.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    run = str(tmp_path / "pre")
    CheckpointManager(os.path.join(run, "checkpoints"), {"model": fw}, meta={"config": config.to_dict()},
                      log=lambda m: None).save(11)
    path = str(tmp_path / "pre.safetensors")
    export_backbone(run, path, log=lambda m: None)
    a = tuner(synth_root, tmp_path / "a", checkpoint=run)
    b = tuner(synth_root, tmp_path / "b", checkpoint=path)
    ref = fw.backbone.state_dict()
    sa, sb = a.model.backbone.state_dict(), b.model.backbone.state_dict()
    assert sa.keys() == sb.keys() == ref.keys()
    for k in ref:
        assert torch.equal(sa[k], ref[k]) and torch.equal(sb[k], ref[k]), k
    key_encoder = [m for n, m in fw.named_children() if m is not fw.backbone and hasattr(m, "feature_dim")]
    assert key_encoder and any(not torch.equal(v, key_encoder[0].state_dict()[k]) for k, v in ref.items()
                               if v.is_floating_point())
    assert torch.equal(a.model.fc.weight, b.model.fc.weight)  # same seed, same head
    assert (a.source["method"], a.source["step"], b.source["method"]) == ("moco", 11, "moco")
    with pytest.raises(ConfigError, match="model.backbone"):
        tuner(synth_root, tmp_path / "c", checkpoint=path, model=dict(backbone="r3d_18"))


def test_paper_row_only_when_protocol_matches():
    proto = {"dataset": "ucf101", "split": 1, "frames": 16, "stride": 2, "clips": 10, "crop": 112, "size": 128,
             "long": 171}
    pre = {"dataset": "kinetics400", "method": "simclr", "mode": "clip-sr-tc"}
    assert ft.paper_row(proto, pre, "r2plus1d_10")["top1"] == 82.0
    assert ft.paper_row({**proto, "dataset": "hmdb51"}, {**pre, "dataset": "ucf101", "method": "moco"},
                        "r2plus1d_10")["top1"] == 47.5
    for bad in ({"split": 2}, {"clips": 1}, {"stride": 4}, {"dataset": "synthetic"}):
        assert ft.paper_row({**proto, **bad}, pre, "r2plus1d_10") is None, bad
    for bad in ({"method": "moco"}, {"mode": "baseline"}, {"dataset": None}):
        assert ft.paper_row(proto, {**pre, **bad}, "r2plus1d_10") is None, bad


# ----------------------------------------------------------------------------- CLI smoke run
def _check_png(path):
    assert os.path.getsize(path) > 2000, path
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_finetune_resume_test_and_report(synth_root, tmp_path, capsys):
    import yaml
    cfg_path = tmp_path / "ft.yaml"
    cfg = tiny_config(synth_root, data=dict(holdout=4), test=dict(val_every_epochs=1))
    cfg_path.write_text(yaml.safe_dump(cfg))
    p = argparse.ArgumentParser(prog="dualvar")
    add_finetune(p.add_subparsers(dest="command", required=True))
    run = str(tmp_path / "run")
    # 8 train videos, batch 4: 2 steps per epoch; stop after epoch 1, then resume to the end of epoch 2
    args = p.parse_args(["finetune", "--config", str(cfg_path), "--run-dir", run, "train.max_steps=2"])
    assert args.func(args) == 0
    args = p.parse_args(["finetune", "--config", str(cfg_path), "--run-dir", run])
    assert args.func(args) == 2  # checkpoints there and no --resume
    assert "--resume auto" in capsys.readouterr().err
    args = p.parse_args(["finetune", "--config", str(cfg_path), "--run-dir", run, "--resume", "auto"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "report:" in out
    res = json.load(open(os.path.join(run, "results.json")))["finetune"]
    assert res["trained"]["steps"] == 4 and res["tested"] == 4 and res["top5_k"] == 4
    assert 0 <= res["top1"] <= res["top5"] <= 1 and res["paper"] is None
    assert res["protocol"]["clips"] == 3 and res["sets"]["val_videos"] == 4 and res["checkpoint"]["random_init"]
    assert [v["epoch"] for v in res["validation"]] == [1, 2]  # both processes' (from metrics.jsonl)
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["epoch"] for r in rows if "val_top1" in r] == [1, 2]
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["resumed_from"] == 2 and summary["steps_this_run"] == 2
    # the interrupted + resumed run is the uninterrupted run, step for step
    whole = str(tmp_path / "whole")
    args = p.parse_args(["finetune", "--config", str(cfg_path), "--run-dir", whole])
    assert args.func(args) == 0
    rows_whole = [json.loads(line) for line in open(os.path.join(whole, "metrics.jsonl"))]
    keys = ("step", "loss", "train_top1", "lr", "val_top1")
    assert [{k: r.get(k) for k in keys} for r in rows] == [{k: r.get(k) for k in keys} for r in rows_whole]
    from dualvar.engine.checkpoint import list_checkpoints, read_checkpoint
    a = read_checkpoint(list_checkpoints(os.path.join(run, "checkpoints"))[0][1])["parts"]
    b = read_checkpoint(list_checkpoints(os.path.join(whole, "checkpoints"))[0][1])["parts"]
    assert a["data"] == b["data"] and a["trainer"] == b["trainer"]
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    md = open(os.path.join(run, "report.md")).read()
    assert "## Fine-tuning" in md and "Table 4 is not shown" in md and ft.TRAINING_PNG in md
    for name in (ft.TRAINING_PNG, ft.CONFUSION_PNG):
        _check_png(os.path.join(run, name))
    # --test-only scores the newest checkpoint again: same weights, same answer
    args = p.parse_args(["finetune", "--config", str(cfg_path), "--run-dir", run, "--test-only"])
    assert args.func(args) == 0
    again = json.load(open(os.path.join(run, "results.json")))["finetune"]
    assert again["top1"] == res["top1"] and again["confusion"] == res["confusion"]
    args = p.parse_args(["finetune", "--config", "ucf101_after_ucf101", "--run-dir", str(tmp_path / "x")])
    assert args.func(args) == 2 and "model.checkpoint" in capsys.readouterr().err
