"""The pretraining config: presets, overrides, validation messages, the saved YAML, the missing-dataset line."""
import os
import subprocess
import sys

import pytest
import yaml

from dualvar.engine.config import (Config, ConfigError, apply_overrides, from_dict, load_config, preset_names,
                                   save_config)

PAPER = dict(batch_size=64, lr=0.003, momentum=0.9, weight_decay=1e-4, milestones=(120, 160), gamma=0.1, epochs=200,
             tau=0.07, theta=0.05, n_series=2, series_dim=64)


def test_presets_exist_and_validate():
    names = set(preset_names())
    assert {"demo", "ucf101_r21d_simclr_dualvar", "ucf101_r21d_moco_dualvar", "k400_r21d_simclr_dualvar",
            "ucf101_r21d_simclr_baseline", "ucf101_r21d_moco_baseline"} <= names
    for name in names:
        assert isinstance(load_config(name), Config)


@pytest.mark.parametrize("name,framework,mode,dataset", [
    ("ucf101_r21d_simclr_dualvar", "simclr", "clip-sr-tc", "ucf101"),
    ("ucf101_r21d_moco_dualvar", "moco", "clip-sr-tc", "ucf101"),
    ("ucf101_r21d_simclr_baseline", "simclr", "baseline", "ucf101"),
    ("ucf101_r21d_moco_baseline", "moco", "baseline", "ucf101"),
    ("k400_r21d_simclr_dualvar", "simclr", "clip-sr-tc", "kinetics400"),
])
def test_paper_presets_hold_the_paper_settings(name, framework, mode, dataset):
    c = load_config(name)
    assert (c.model.framework, c.model.mode, c.data.dataset, c.model.backbone) == (framework, mode, dataset,
                                                                                   "r2plus1d_10")
    got = dict(batch_size=c.data.batch_size, lr=c.optim.lr, momentum=c.optim.momentum,
               weight_decay=c.optim.weight_decay, milestones=c.optim.milestones, gamma=c.optim.gamma,
               epochs=c.train.epochs, tau=c.loss.tau, theta=c.loss.theta, n_series=c.model.n_series,
               series_dim=c.model.series_dim)
    assert got == PAPER
    assert (c.optim.name, c.optim.schedule, c.optim.warmup_epochs) == ("sgd", "multistep", 0)
    assert (c.data.frames, c.data.stride, c.data.crop, c.data.holdout) == (16, 4, 112, 800)
    if framework == "moco":
        assert (c.loss.queue_size, c.model.momentum) == (16384, 0.999)


def test_overrides_change_values_and_types():
    c = load_config("demo", ["optim.lr=0.01", "data.batch_size=8", "optim.milestones=[3, 5]", "loss.cap=null",
                             "train.progress=false", "optim.weight_decay=1e-5"])
    assert c.optim.lr == 0.01 and c.data.batch_size == 8 and c.optim.milestones == (3, 5)
    assert c.loss.cap is None and c.train.progress is False and c.optim.weight_decay == 1e-5
    assert isinstance(c.optim.lr, float)


@pytest.mark.parametrize("override,named", [
    ("optim.lrr=0.1", "optim.lrr"),
    ("optimizer.lr=0.1", "optimizer"),
    ("data.batchsize=4", "data.batchsize"),
])
def test_unknown_key_is_named(override, named):
    with pytest.raises(ConfigError, match=rf"unknown config key {named}\b"):
        load_config("demo", [override])


@pytest.mark.parametrize("override,named", [
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=fast", "optim.lr"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.batch_size=2.5", "data.batch_size"),
    ("model.framework=byol", "model.framework"),
    ("model.backbone=resnet50", "model.backbone"),
    ("model.mode=clip-only", "model.mode"),
    ("optim.schedule=step", "optim.schedule"),
    ("optim.milestones=[160, 120]", "optim.milestones"),
    ("train.precision=fp8", "train.precision"),
    ("train.progress=maybe", "train.progress"),
    ("loss.sr_weights=[1]", "loss.sr_weights"),
    ("data.crop=200", "data.crop"),
    ("data.frames=9", "data.frames"),  # not divisible by n_series = 2
])
def test_bad_value_is_named(override, named):
    with pytest.raises(ConfigError, match=rf"^{named} must be"):
        load_config("demo", [override])


def test_moco_queue_must_hold_whole_batches():
    with pytest.raises(ConfigError, match="loss.queue_size"):
        load_config("demo", ["model.framework=moco", "loss.queue_size=100", "data.batch_size=8"])


def test_malformed_overrides_and_missing_preset():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config("demo", ["optim.lr"])
    with pytest.raises(ConfigError, match="no config 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="optim.lr is not a section"):
        apply_overrides({"optim": {"lr": 0.1}}, ["optim.lr.x=1"])


def test_base_preset_inherits_and_overrides():
    base, moco = load_config("ucf101_r21d_simclr_dualvar"), load_config("ucf101_r21d_moco_baseline")
    assert moco.model.framework == "moco" and moco.model.mode == "baseline"
    assert moco.optim == base.optim and moco.data == base.data


def test_saved_yaml_round_trips(tmp_path):
    c = load_config("ucf101_r21d_moco_dualvar", ["optim.lr=0.5", "loss.cap=.inf"])
    path = tmp_path / "config.yaml"
    save_config(c, str(path))
    again = load_config(str(path))
    assert again == c
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == 0.5


def test_defaults_are_the_paper_settings():
    c = from_dict({"data": {"index": "x.jsonl"}})
    assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay, c.optim.milestones) == (0.003, 0.9, 1e-4, (120, 160))


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "dualvar.engine.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=120)


def test_cli_bad_key_fails_before_data(tmp_path):
    # a nonexistent index: the key error must come first, and nothing is written
    r = _cli("pretrain", "--config", "ucf101_r21d_simclr_dualvar", "--run-dir", str(tmp_path / "run"),
             "optim.lrr=0.1", cwd=tmp_path)
    assert r.returncode == 2
    assert "unknown config key optim.lrr" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_missing_dataset_names_the_prepare_command(tmp_path):
    r = _cli("pretrain", "--config", "ucf101_r21d_simclr_dualvar", "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "dualvar data index --dataset ucf101" in lines[0] and "--out data/ucf101_split1.jsonl" in lines[0]
    r = _cli("pretrain", "--config", "k400_r21d_simclr_dualvar", "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2 and "dualvar data index --dataset kinetics400" in r.stderr


def test_config_changes_lists_differing_keys():
    from dualvar.engine.config import config_changes
    a = load_config("demo")
    b = load_config("demo", ["optim.lr=0.5", "checkpoint.resume=auto"])
    assert config_changes(a, b) == ["optim.lr: 0.001 -> 0.5"]
