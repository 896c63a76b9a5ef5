"""`dualvar demo --quick` end to end on the CPU: synthetic set, two pretraining runs with the same budget,
retrieval and linear probe of both and of the random init, one table, the report, and re-running."""
import argparse
import json
import os

import pytest
import torch

from dualvar.engine import demo
from dualvar.engine.evaluate.cli import add_demo


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()  # the demo sets its own (--threads)
    yield
    torch.set_num_threads(n)


def _parser():
    p = argparse.ArgumentParser(prog="dualvar")
    add_demo(p.add_subparsers(dest="command", required=True))
    return p


def test_demo_configs_differ_only_in_mode():
    a, b = demo.demo_configs(epochs=3)
    da, db = a.to_dict(), b.to_dict()
    assert (da["model"]["mode"], db["model"]["mode"]) == ("clip-sr-tc", "baseline")
    assert da["model"]["framework"] == "simclr" and da["model"]["backbone"] == "tiny"
    da["model"].pop("mode"), db["model"].pop("mode"), da.pop("name"), db.pop("name")
    assert da == db and da["train"]["epochs"] == 3


def test_random_init_is_the_runs_starting_point(tmp_path, monkeypatch):
    """The table's "random init" row is the weights both pretraining runs start from, as the demo says."""
    from dualvar.engine.evaluate import load_backbone
    from dualvar.engine.trainer import Trainer
    monkeypatch.setenv("DUALVAR_CACHE", str(tmp_path / "cache"))
    for cfg in demo.demo_configs(quick=True, overrides=["train.seed=3"]):
        start = Trainer(cfg, str(tmp_path / cfg.name)).framework.backbone.state_dict()
        model, _ = load_backbone(demo.random_init_spec(cfg))
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in start.items())


def test_quick_demo_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DUALVAR_CACHE", str(tmp_path / "cache"))
    out = str(tmp_path / "demo")
    args = _parser().parse_args(["demo", "--quick", "--out", out])
    assert args.func(args) == 0
    printed = capsys.readouterr()
    assert "[demo 5/5" in printed.err and "[demo 1/5" in printed.err  # progress throughout
    report = os.path.join(out, "comparison.md")
    assert f"report: {os.path.abspath(report)}" in printed.out
    table = [line for line in printed.out.splitlines() if line.startswith("|")]
    assert len(table) == 5  # header, rule, three runs
    assert [line.split("|")[1].strip() for line in table[2:]] == ["dualvar_clip-sr-tc", "simclr_baseline",
                                                                  "random_init"]
    assert "simclr clip-sr-tc" in table[2] and "simclr baseline" in table[3] and "random init" in table[4]
    md = open(report).read()
    assert all(line in md for line in table) and "Wall time" in md
    assert os.path.getsize(os.path.join(out, "comparison.png")) > 2000
    info = json.load(open(os.path.join(out, "demo.json")))
    assert info["quick"] and info["steps"] == 2 and info["threads"] == 1
    for name in demo.RUNS.values():
        res = json.load(open(os.path.join(out, name, "results.json")))
        assert set(res["retrieval"]["recall"]) == {"1", "5", "10", "20", "50"}
        assert 0 <= res["linear_probe"]["top1"] <= 1 and res["retrieval"]["clips"]["clips"] == demo.QUICK_CLIPS
        assert res["retrieval"]["queries"] == 4 and res["retrieval"]["gallery"] == 12
        assert os.path.isfile(os.path.join(out, name, "report.md"))
    for name in ("dualvar_clip-sr-tc", "simclr_baseline"):
        summary = json.load(open(os.path.join(out, name, "summary.json")))
        assert summary["steps"] == 2  # the same budget
    # numbers in the table are the runs' own
    r1 = json.load(open(os.path.join(out, "random_init", "results.json")))["retrieval"]["recall"]["1"]
    assert f"{100 * r1:.1f}" in table[4]
    # a second demo replaces the first one's runs; a folder that a demo did not write is refused
    open(os.path.join(out, "simclr_baseline", "stale"), "w").close()
    assert args.func(args) == 0
    assert not os.path.exists(os.path.join(out, "simclr_baseline", "stale"))
    os.remove(os.path.join(out, "random_init", demo.MARKER))
    assert args.func(args) == 2
    assert "was not written by `dualvar demo`" in capsys.readouterr().err
