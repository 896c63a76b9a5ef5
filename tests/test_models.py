"""Backbones and heads (docs/method.md §2.1-2.2): the paper's R(2+1)D-10 / R3D-10 sizes and inner widths,
every backbone's pooled output, torchvision key compatibility, local weight files, unit-norm heads."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import video as tvv

from dualvar.engine.models import BACKBONES, ClipHead, SeriesHead, build_backbone, conv2plus1d_width
from helpers import one_thread  # noqa: F401  (one_thread: an autouse fixture)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# The reference's backbones (backbone/r21d.py and r3d.py with layer_sizes (1, 1, 1, 1)) count 14,365,303 and
# 14,361,792 parameters; the paper rounds them to 14.4 M, docs/method.md §2.1 to 14.37 M and 14.36 M.
@pytest.mark.parametrize("name,millions,exact", [("r2plus1d_10", 14.37, 14_365_303), ("r3d_10", 14.36, 14_361_792)])
def test_paper_backbone_parameter_counts(name, millions, exact):
    n = n_params(build_backbone(name))
    assert abs(n / 1e6 - millions) <= 0.01 * millions, n
    assert n == exact


def test_r2plus1d_10_inner_widths():
    """floor(t*h*w*in*out / (h*w*in + t*out)) per (2+1)D conv from its own in/out channels: stem 83, the
    second conv of a downsampling block uses out/out (288 in stage 2, not the first conv's 230), and the
    (2+1)D 1x1x1 shortcut floor(in*out / (in + out))."""
    m = build_backbone("r2plus1d_10")
    assert m.stem[0].out_channels == 83 and m.stem[0].kernel_size == (1, 7, 7) and m.stem[3].kernel_size == (3, 1, 1)
    assert m.stem[0].stride == (1, 2, 2)
    expect = {"layer1": (64, 64, 144, 144), "layer2": (64, 128, 230, 288), "layer3": (128, 256, 460, 576),
              "layer4": (256, 512, 921, 1152)}
    for name, (cin, cout, mid1, mid2) in expect.items():
        block = getattr(m, name)[0]
        assert block.conv1[0][0].out_channels == mid1 == conv2plus1d_width(cin, cout), name
        assert block.conv2[0][0].out_channels == mid2 == conv2plus1d_width(cout, cout), name
        if name != "layer1":
            short = block.downsample[0]
            assert short[0].out_channels == cin * cout // (cin + cout), name
            assert short[0].stride == (1, 2, 2) and short[3].stride == (2, 1, 1), name
            assert isinstance(short[2], nn.ReLU) and isinstance(block.downsample[1], nn.BatchNorm3d)


def _input(name, gen):
    n = 2 if name == "tiny" else 1
    return torch.randn(n, 3, 8, 32, 32, generator=gen)


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_returns_pooled_feature(name, gen):
    torch.manual_seed(0)
    m = build_backbone(name).eval()
    x = _input(name, gen)
    with torch.no_grad():
        y = m(x)
    F_ = {"s3d": 1024, "tiny": 64}.get(name, 512)
    assert m.feature_dim == F_ and y.shape == (x.shape[0], F_) and bool(torch.isfinite(y).all())
    assert not any(k.startswith(("fc.", "classifier.")) for k in m.state_dict())


def test_tiny_trains_and_is_small(gen):
    m = build_backbone("tiny")
    assert n_params(m) < 300_000
    x = torch.randn(4, 3, 8, 32, 32, generator=gen)
    m(x).square().mean().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in m.parameters())


@pytest.mark.parametrize("name,ctor,head", [("r2plus1d_18", tvv.r2plus1d_18, "fc"), ("r3d_18", tvv.r3d_18, "fc"),
                                            ("mc3_18", tvv.mc3_18, "fc"), ("s3d", tvv.s3d, "classifier")])
def test_torchvision_backbones_keep_torchvision_keys(name, ctor, head, gen):
    """Export relies on it: our state_dict loads strictly into torchvision's model with its classifier set to
    nn.Identity, and (VideoResNet) both compute the same pooled feature."""
    ours = build_backbone(name).eval()
    ref = ctor(weights=None).eval()
    setattr(ref, head, nn.Identity())
    ref.load_state_dict(ours.state_dict(), strict=True)
    if head == "fc":
        x = _input(name, gen)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x))


def test_weights_from_a_local_file(tmp_path, gen):
    """A torchvision-style file (classifier keys included) loads into the backbone; a missing file or a
    file of another architecture fails naming the argument."""
    src = build_backbone("tiny")
    state = {**src.state_dict(), "fc.weight": torch.randn(400, 64), "fc.bias": torch.zeros(400)}
    torch.save(state, tmp_path / "tiny.pth")
    m = build_backbone("tiny", weights=str(tmp_path / "tiny.pth"))
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "tiny.safetensors"))
    m = build_backbone("tiny", weights=tmp_path / "tiny.safetensors")
    assert torch.equal(m.layer4[0].conv2[0].weight, src.layer4[0].conv2[0].weight)
    with pytest.raises(FileNotFoundError, match="weights"):
        build_backbone("tiny", weights=str(tmp_path / "missing.pth"))
    torch.save(build_backbone("r3d_10").state_dict(), tmp_path / "r3d.pth")
    with pytest.raises(ValueError, match="weights: .* does not match"):
        build_backbone("tiny", weights=str(tmp_path / "r3d.pth"))


def test_unknown_backbone_name():
    with pytest.raises(ValueError, match="backbone name must be one of"):
        build_backbone("r50")


# ------------------------------------------------------------------------------------------ heads
def _ref_mlp(mlp: nn.Sequential, h: torch.Tensor) -> torch.Tensor:
    """Linear -> ReLU -> Linear in float64, from the head's own weights."""
    w1, b1, w2, b2 = (t.detach().double() for t in (mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias))
    return torch.relu(h.double() @ w1.t() + b1) @ w2.t() + b2


def test_clip_head_unit_norm(gen):
    head = ClipHead(16, dim=8)
    h = torch.randn(5, 16, generator=gen)
    z = head(h)
    assert z.shape == (5, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    ref = _ref_mlp(head.mlp, h)
    torch.testing.assert_close(z.double(), ref / ref.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("s", [1, 2, 3])
def test_series_head_unit_norm_per_chunk_and_raw(s, gen):
    head = SeriesHead(16, n_series=s, dim=4)
    h = torch.randn(5, 16, generator=gen)
    u = head(h)
    assert u.shape == (5, s, 4)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(5, s))
    ref = _ref_mlp(head.mlp, h).view(5, s, 4)  # chunk k = output features k*d .. (k+1)*d - 1
    torch.testing.assert_close(u.double(), ref / ref.norm(dim=-1, keepdim=True), rtol=1e-5, atol=1e-6)
    raw = head(h, normalize=False)
    torch.testing.assert_close(raw.double(), ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(5, s))
    torch.testing.assert_close(F.normalize(raw, dim=-1), u)


def test_head_dims_are_checked():
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        ClipHead(16, dim=0)
    with pytest.raises(ValueError, match="n_series"):
        SeriesHead(16, n_series=0)


def test_heads_return_float32_under_autocast(gen):
    """Under bf16 autocast the Linear layers run in bf16; every head output comes back float32, so the
    objective gets one dtype."""
    h = torch.randn(3, 16, generator=gen)
    clip, series = ClipHead(16, dim=8), SeriesHead(16, n_series=2, dim=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert clip.mlp(h).dtype == torch.bfloat16  # the Linear layers did run in bf16
        outs = [clip(h), series(h), series(h, normalize=False)]
    assert all(o.dtype == torch.float32 for o in outs)
    torch.testing.assert_close(outs[0].norm(dim=1), torch.ones(3))
    torch.testing.assert_close(outs[1].norm(dim=-1), torch.ones(3, 2))
    torch.testing.assert_close(outs[0], clip(h), rtol=0.05, atol=0.02)
