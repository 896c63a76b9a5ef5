"""Indexes of UCF101 / HMDB51 / Kinetics-400 / list layouts, the probe cache, the CLI and the synthetic set."""
import csv
import os
import shutil

import numpy as np
import pytest

from dualvar.engine.cli import main as dualvar_main
from dualvar.engine.data.index import build_index, load_index
from dualvar.engine.data.synthetic import class_names, render_video, shape_path, write_synthetic_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth"))
    info = write_synthetic_dataset(root, classes=3, videos_per_class=3, frames=24, height=64, width=64, seed=5,
                                   workers=1)
    return root, info


def test_synthetic_layout_is_ucf101(synth):
    root, info = synth
    names = class_names(3)
    assert info["classes"] == names
    lists = os.path.join(root, "ucfTrainTestlist")
    assert open(os.path.join(lists, "classInd.txt")).read().split("\n")[:3] == [f"{i + 1} {n}" for i, n in
                                                                                 enumerate(names)]
    train = [ln.split() for ln in open(os.path.join(lists, "trainlist01.txt"))]
    test = [ln.split() for ln in open(os.path.join(lists, "testlist01.txt"))]
    assert len(train) == 6 and len(test) == 3
    for rel, label in train:
        cls = rel.split("/")[0]
        assert label == str(names.index(cls) + 1)
        assert os.path.basename(rel).startswith(f"v_{cls}_g") and rel.endswith(".avi")
    groups = lambda rows: {r[0].split("_g")[1][:2] + r[0].split("/")[0] for r in rows}
    assert not groups(train) & groups(test)  # train and test never share a group


def test_ucf101_index_and_cache(synth, tmp_path):
    root, info = synth
    out = str(tmp_path / "ucf.jsonl")
    r = build_index("ucf101", root, out)
    assert r["probed"] == 9
    entries = load_index(out)
    assert len(entries) == 9
    for e in entries:
        assert e["status"] == "ok" and e["n_frames"] == 24 and (e["height"], e["width"]) == (64, 64)
        assert e["class_name"] == os.path.basename(os.path.dirname(e["path"]))
        assert e["label"] == info["classes"].index(e["class_name"])
        assert abs(e["fps"] - 25) < 1e-6
    s = r["summary"]
    assert s["per_split"] == {"test": 3, "train": 6} and s["classes"] == 3
    assert s["shorter_than_clip"] == 9  # 24 frames < 61
    # unchanged folder: nothing is probed again, same index
    r2 = build_index("ucf101", root, out)
    assert r2["probed"] == 0 and load_index(out) == entries
    # one file changes (size and mtime): only it is probed again
    victim = os.path.join(root, info["train"][0])
    backup = str(tmp_path / "backup.avi")
    shutil.copy2(victim, backup)
    try:
        with open(victim, "r+b") as f:
            f.truncate(100)
        r3 = build_index("ucf101", root, out)
        assert r3["probed"] == 1
        bad = [e for e in r3["entries"] if e["path"] == victim]
        assert bad[0]["status"] == "unreadable" and r3["summary"]["unreadable"] == 1
    finally:
        shutil.copy2(backup, victim)


def test_ucf101_missing_and_case_mismatch(synth, tmp_path):
    root, info = synth
    splits = tmp_path / "lists"
    shutil.copytree(os.path.join(root, "ucfTrainTestlist"), splits)
    with open(splits / "trainlist01.txt", "a") as f:
        f.write(f"{info['classes'][0]}/v_{info['classes'][0]}_g99_c01.avi 1\n")
    with open(splits / "testlist01.txt", "a") as f:
        f.write(info["test"][0].upper().replace(".AVI", ".avi") + "\n")  # wrong case, as in UCF101's lists
    r = build_index("ucf101", root, str(tmp_path / "i.jsonl"), splits=str(splits))
    assert r["summary"]["missing"] == 1
    upper = r["entries"][-1]
    assert upper["status"] == "ok" and upper["path"] == os.path.join(root, info["test"][0])


def test_hmdb51_index(synth, tmp_path):
    root, info = synth
    hroot, splits = tmp_path / "hmdb", tmp_path / "hmdb" / "testTrainMulti_7030_splits"
    os.makedirs(splits)
    want = {"train": 0, "test": 0}
    for cls in ["brush_hair", "cartwheel"]:
        os.makedirs(hroot / cls)
        lines = []
        for vi, rel in enumerate(info["train"][:3]):
            name = f"{cls}_video_{vi}.avi"
            shutil.copy(os.path.join(root, rel), hroot / cls / name)
            tag = (1, 2, 0)[vi]
            lines.append(f"{name} {tag}")
            if tag:
                want["train" if tag == 1 else "test"] += 1
        (splits / f"{cls}_test_split1.txt").write_text("\n".join(lines) + "\n")
    r = build_index("hmdb51", str(hroot), str(tmp_path / "h.jsonl"))
    assert r["summary"]["per_split"] == want
    assert {(e["class_name"], e["label"]) for e in r["entries"]} == {("brush_hair", 0), ("cartwheel", 1)}
    assert all(e["status"] == "ok" for e in r["entries"])


def test_kinetics400_index(synth, tmp_path):
    root, info = synth
    kroot = tmp_path / "k400"
    rows = [("abseiling", "aaaaaaaaaaa", 10, 20, "train"), ("air drumming", "bbbbbbbbbbb", 0, 10, "train"),
            ("abseiling", "ccccccccccc", 5, 15, "val"), ("air drumming", "ddddddddddd", 3, 13, "val")]
    for i, (label, yid, t0, t1, split) in enumerate(rows):
        name = f"{yid}_{t0:06d}_{t1:06d}.mp4"
        if split == "train":  # per-class folders (with the label's spaces as in the CSV)
            d = kroot / split / label
        else:  # flat in the split folder
            d = kroot / "val"
        os.makedirs(d, exist_ok=True)
        if i != 3:
            shutil.copy(os.path.join(root, info["train"][i]), d / name)
    with open(tmp_path / "validate.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "youtube_id", "time_start", "time_end", "split", "is_cc"])
        for r in rows:
            w.writerow(list(r) + [0])
    r = build_index("kinetics400", str(kroot), str(tmp_path / "k.jsonl"), splits=str(tmp_path / "validate.csv"))
    e = r["entries"]
    assert [x["label"] for x in e] == [0, 1, 0, 1]
    assert [x["status"] for x in e] == ["ok", "ok", "ok", "missing"]
    assert r["summary"]["per_split"] == {"train": 2, "val": 2} and r["summary"]["missing"] == 1


def test_generic_list_index_and_cli(synth, tmp_path, capsys):
    root, info = synth
    lst = tmp_path / "list.txt"
    lst.write_text(f"{info['train'][0]} 4\n{os.path.join(root, info['test'][0])} 7\nnope.avi 1\n")
    out = str(tmp_path / "l.jsonl")
    assert dualvar_main(["data", "index", "--dataset", "list", "--root", root, "--list", str(lst), "--out", out]) == 0
    text = capsys.readouterr().out
    assert "3 videos" in text and "missing 1" in text
    assert [e["label"] for e in load_index(out)] == [4, 7, 1]
    assert dualvar_main(["data", "index", "--dataset", "list", "--root", root, "--out", out]) == 2
    assert "--list" in capsys.readouterr().err


def test_synth_cli_and_determinism(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for d in (a, b):
        assert dualvar_main(["data", "synth", "--out", d, "--classes", "2", "--videos-per-class", "2",
                             "--frames", "10", "--size", "40x48", "--seed", "3", "--workers", "1"]) == 0
    assert "wrote 4 videos" in capsys.readouterr().out
    files = sorted(os.path.relpath(os.path.join(dp, f), a) for dp, _, fs in os.walk(a) for f in fs)
    assert len(files) == 7
    for rel in files:
        assert open(os.path.join(a, rel), "rb").read() == open(os.path.join(b, rel), "rb").read()
    np.testing.assert_array_equal(render_video("UpThenDown", 6, 20, 30, 1), render_video("UpThenDown", 6, 20, 30, 1))
    assert not np.array_equal(render_video("UpThenDown", 6, 20, 30, 1), render_video("UpThenDown", 6, 20, 30, 2))


@pytest.mark.parametrize("cls,first,second", [("RightThenDown", (0, 1, 0), (1, 0, 0)),
                                              ("DownThenRight", (1, 0, 0), (0, 1, 0)),
                                              ("GrowThenUp", (0, 0, 1), (-1, 0, 0)),
                                              ("LeftThenRight", (0, -1, 0), (0, 1, 0)),
                                              ("ShrinkThenGrow", (0, 0, -1), (0, 0, 1))])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_is_the_temporal_order_of_motions(cls, first, second, seed):
    T, H, W = 32, 72, 96
    path = shape_path(cls, T, H, W, seed)
    half = T // 2
    for (a, b), want in (((0, half), first), ((half, T - 1), second)):
        delta = path[b] - path[a]
        for axis in range(3):
            if want[axis] == 0:
                assert abs(delta[axis]) < 1e-9
            else:
                assert np.sign(delta[axis]) == want[axis] and abs(delta[axis]) > (0.2 * H if axis < 2 else 0.5)
    # the whole shape stays inside the frame, and the video draws it where the path says
    assert (path[:, 0] - path[:, 2] >= -1e-9).all() and (path[:, 0] + path[:, 2] <= H + 1e-9).all()
    assert (path[:, 1] - path[:, 2] >= -1e-9).all() and (path[:, 1] + path[:, 2] <= W + 1e-9).all()
    if not any(first[:2]) and not any(second[:2]):
        return  # the shape never leaves its centre pixel: nothing to compare it against
    video = render_video(cls, T, H, W, seed).astype(np.float32)
    for t in (0, half, T - 1):
        cy, cx, _ = np.round(path[t, :2]).astype(int).tolist() + [0]
        centre = video[t, cy, cx]
        centres = video[:, cy, cx]
        assert np.abs(centres - centre).sum(-1).max() > 20  # not a background pixel: it changes over time


def test_appearance_varies_within_a_class():
    a = render_video("RightThenDown", 4, 32, 40, 1)
    b = render_video("RightThenDown", 4, 32, 40, 2)
    assert np.abs(a.astype(np.float32).mean((0, 1, 2)) - b.astype(np.float32).mean((0, 1, 2))).max() > 5
