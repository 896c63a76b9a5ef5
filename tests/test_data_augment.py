"""Augmentation: batched device ops vs torchvision applied per sample; crops; worker-side draws."""
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from dualvar.engine.data import augment as A
from dualvar.engine.data.dataset import to_views
from dualvar.kernels import permute_frames_reference


def tv_per_frame(x, fn):
    """Apply a torchvision op to (C, T, H, W) as a video of T frames (T, C, H, W)."""
    return fn(x.transpose(0, 1)).transpose(0, 1)


@pytest.fixture
def clips(gen):
    # odd sizes; include grey pixels (hue undefined) and saturated ones
    x = torch.rand(5, 3, 3, 17, 13, generator=gen)
    x[0, :, 0, :3, :3] = 0.5
    x[1, 0, 1] = 1.0
    return x


@pytest.mark.parametrize("op,tv", [
    (A.adjust_brightness, TF.adjust_brightness), (A.adjust_contrast, TF.adjust_contrast),
    (A.adjust_saturation, TF.adjust_saturation), (A.adjust_hue, TF.adjust_hue)])
def test_jitter_ops_match_torchvision(clips, gen, op, tv):
    N = clips.shape[0]
    if op is A.adjust_hue:
        f = torch.rand(N, generator=gen) * 0.4 - 0.2
    else:
        f = torch.rand(N, generator=gen) * 1.6 + 0.2
    got = op(clips.clone(), f)
    want = torch.stack([tv_per_frame(clips[i], lambda v, i=i: tv(v, float(f[i]))) for i in range(N)])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_blur_matches_torchvision(clips, gen):
    N = clips.shape[0]
    sigma = torch.rand(N, generator=gen) * 1.9 + 0.1
    K = A.gaussian_kernel_size(2.0)
    assert K == 13
    x = torch.rand(N, 3, 2, 29, 31, generator=gen)
    got = A.gaussian_blur(x, sigma)
    want = torch.stack([tv_per_frame(x[i], lambda v, i=i: TF.gaussian_blur(v, [K, K], [float(sigma[i])] * 2))
                        for i in range(N)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_apply_colour_matches_sequential_reference(clips, masked):
    rng = np.random.default_rng(7)
    N = clips.shape[0]
    params = [{**A.sample_jitter(rng, p=0.7), **A.sample_blur(rng, p=0.6)} for _ in range(N)]
    params[0]["jitter_apply"] = True
    params[1]["jitter_apply"] = False
    params[1]["blur_apply"] = False
    jit = torch.from_numpy(np.stack([p["jitter"] for p in params]))
    order = torch.from_numpy(np.stack([p["jitter_order"] for p in params]))
    japp = torch.tensor([p["jitter_apply"] for p in params])
    sig = torch.tensor([float(p["blur_sigma"]) for p in params])
    bapp = torch.tensor([p["blur_apply"] for p in params])
    got = A.apply_colour(clips, jit, order, japp, sig, bapp, masked=masked)
    tv_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    K = A.gaussian_kernel_size(2.0)
    for i in range(N):
        want = clips[i]
        if japp[i]:
            for op in order[i].tolist():
                want = tv_per_frame(want, lambda v, i=i, op=op: tv_ops[op](v, float(jit[i, op])))
        if bapp[i]:
            want = tv_per_frame(want, lambda v, i=i: TF.gaussian_blur(v, [K, K], [float(sig[i])] * 2))
        torch.testing.assert_close(got[i], want, atol=3e-5, rtol=0)
    torch.testing.assert_close(got[1], clips[1], atol=0, rtol=0)  # nothing applied: unchanged


def test_pretrain_view_probabilities():
    rng = np.random.default_rng(0)
    n = 4000
    for view, null_p in enumerate(A.PRETRAIN_NULL_PROB):
        draws = [A.sample_pretrain_view_params(rng, view) for _ in range(n)]
        null = np.mean([d["pipeline_null"] for d in draws])
        jit = np.mean([d["jitter_apply"] for d in draws])
        blur = np.mean([d["blur_apply"] for d in draws])
        assert abs(null - null_p) < 0.03
        assert abs(jit - 0.64 * (1 - null_p)) < 0.03
        assert abs(blur - 0.5 * (1 - null_p)) < 0.03
        f = np.stack([d["jitter"] for d in draws])
        assert f[:, :3].min() >= 0.2 and f[:, :3].max() <= 1.8 and np.abs(f[:, 3]).max() <= 0.2
        assert f[:, :3].min() < 0.25 and f[:, :3].max() > 1.75  # spans the range
        s = np.array([d["blur_sigma"] for d in draws])
        assert s.min() >= 0.1 and s.max() <= 2.0
        orders = {tuple(d["jitter_order"]) for d in draws}
        assert len(orders) == 24  # every order of the four ops occurs


def test_random_crop_is_clip_consistent_and_covers_offsets():
    rng = np.random.default_rng(0)
    T, H, W = 4, 171, 128  # the reference's portrait quirk: W 128 x H 171
    clip = np.random.default_rng(1).integers(0, 256, (T, H, W, 3), dtype=np.uint8)
    seen_y, seen_x = set(), set()
    for _ in range(3000):
        y0, x0 = A.crop_offset(rng, H, W, 112)
        seen_y.add(y0), seen_x.add(x0)
    assert seen_y == set(range(0, 60)) and seen_x == set(range(0, 17))
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    y0, x0 = A.crop_offset(r1, H, W, 112)
    out = A.random_crop(clip, r2, 112)
    assert out.shape == (T, 112, 112, 3)
    np.testing.assert_array_equal(out, clip[:, y0:y0 + 112, x0:x0 + 112])


def test_centre_crop_offsets_match_reference():
    clip = np.random.default_rng(2).integers(0, 256, (2, 171, 128, 3), dtype=np.uint8)
    np.testing.assert_array_equal(A.centre_crop(clip, 112), clip[:, 30:142, 8:120])  # docs/method.md §6.2: x 8, y 30
    ref = TF.center_crop(torch.from_numpy(clip).permute(0, 3, 1, 2), [112, 112]).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(A.centre_crop(clip, 112), ref)
    odd = clip[:, :117, :113]
    np.testing.assert_array_equal(A.centre_crop(odd, 112), TF.center_crop(
        torch.from_numpy(odd).permute(0, 3, 1, 2), [112, 112]).permute(0, 2, 3, 1).numpy())
    with pytest.raises(ValueError, match="smaller"):
        A.centre_crop(clip[:, :100], 112)


def test_resize_hw_quirk():
    assert A.resize_hw() == (128, 171)
    assert A.resize_hw(reference_resize=True) == (171, 128)


def test_to_views_matches_reference_pipeline(gen):
    B, V, T, H, W = 2, 3, 4, 9, 11
    video = torch.randint(0, 256, (B, V, T, H, W, 3), dtype=torch.uint8, generator=gen)
    rng = np.random.default_rng(3)
    params = [[A.sample_pretrain_view_params(rng, v) for v in range(V)] for _ in range(B)]
    params[0][1]["jitter_apply"] = params[0][1]["blur_apply"] = True
    batch = {"video": video,
             "jitter": torch.tensor(np.array([[p["jitter"] for p in row] for row in params])),
             "jitter_order": torch.tensor(np.array([[p["jitter_order"] for p in row] for row in params])),
             "jitter_apply": torch.tensor([[p["jitter_apply"] for p in row] for row in params]),
             "blur_sigma": torch.tensor([[float(p["blur_sigma"]) for p in row] for row in params]),
             "blur_apply": torch.tensor([[p["blur_apply"] for p in row] for row in params]),
             "hflip": torch.tensor([[True, False, True], [False, False, True]])}
    got = to_views(batch, "cpu")
    assert got.shape == (B, V, 3, T, H, W)
    flat = video.reshape(B * V, T, H, W, 3)
    x01 = permute_frames_reference(flat, torch.arange(T).expand(B * V, T), (0, 0, 0), (1, 1, 1),
                                   hflip=batch["hflip"].reshape(-1))
    col = A.apply_colour(x01, batch["jitter"].reshape(-1, 4), batch["jitter_order"].reshape(-1, 4),
                         batch["jitter_apply"].reshape(-1), batch["blur_sigma"].reshape(-1),
                         batch["blur_apply"].reshape(-1))
    mean = torch.tensor(A.IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(A.IMAGENET_STD).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(got.reshape(B * V, 3, T, H, W), (col - mean) / std, atol=1e-5, rtol=0)
    # without jitter fields (evaluation): plain normalisation
    ev = to_views({"video": video}, "cpu")
    plain = permute_frames_reference(flat, torch.arange(T).expand(B * V, T), A.IMAGENET_MEAN, A.IMAGENET_STD)
    torch.testing.assert_close(ev.reshape(B * V, 3, T, H, W), plain, atol=1e-5, rtol=0)


def test_sample_result_does_not_depend_on_the_batch(clips):
    rng = np.random.default_rng(11)
    N = clips.shape[0]
    params = [{**A.sample_jitter(rng, p=1.0), **A.sample_blur(rng, p=0.5)} for _ in range(N)]
    args = [torch.from_numpy(np.stack([p["jitter"] for p in params])),
            torch.from_numpy(np.stack([p["jitter_order"] for p in params])),
            torch.tensor([p["jitter_apply"] for p in params]),
            torch.tensor([float(p["blur_sigma"]) for p in params]), torch.tensor([p["blur_apply"] for p in params])]
    full = A.apply_colour(clips, *args)
    for i in (0, N - 1):
        alone = A.apply_colour(clips[i:i + 1], *[a[i:i + 1] for a in args])
        torch.testing.assert_close(alone[0], full[i], atol=1e-6, rtol=0)
