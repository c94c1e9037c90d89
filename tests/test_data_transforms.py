"""Temporal sampling and clip-consistent spatial transforms, per modality semantics.

Hand-computed frame indices for ``UniformSegments``; for the spatial side, every modality is fed
content whose correct transform is known (a moving square and its flow, a bright blob and its
keypoint, left/right joints) and checked after the *same* crop / resize / flip.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmfsar.errors import ConfigError, DataError
from mmfsar.data.meta import DatasetFolder
from mmfsar.data.transforms import (
    ClipAugmentation,
    ClipParams,
    UniformSegments,
    crop_resize,
    gaussian_heatmaps,
    transform_keypoints,
)

FULL = ClipParams()
FULL_FLIP = ClipParams(flip=True)


@pytest.fixture(scope="module")
def bound(tiny_dataset, make_modalities):
    """Every modality of configs/modality/, bound to the tiny synthetic dataset."""
    folder = DatasetFolder.open(tiny_dataset)
    mods = make_modalities("rgb", "flow", "pose", "pose_keypoints", "depth")
    return {k: m.bind(folder) for k, m in mods.items()}


# ------------------------------------------------------------------------------------------------
# UniformSegments
# ------------------------------------------------------------------------------------------------


def test_evaluation_takes_segment_centres():
    # [5, 15): 4 segments of 2.5 frames, centres 1.25, 3.75, 6.25, 8.75 -> floor -> +5
    np.testing.assert_array_equal(UniformSegments(4)(5, 15, jitter=False), [6, 8, 11, 13])
    # [0, 16): 8 segments of 2 frames, centres 1, 3, ..., 15
    np.testing.assert_array_equal(UniformSegments(8)(0, 16, jitter=False), [1, 3, 5, 7, 9, 11, 13, 15])
    # one frame per segment: every frame once
    np.testing.assert_array_equal(UniformSegments(8)(3, 11, jitter=False), np.arange(3, 11))
    assert UniformSegments(4)(5, 15, jitter=False).dtype == np.int64


def test_short_clips_repeat_frames_evenly_in_order():
    # 3 frames, 8 samples: centres (2k + 1) * 3 / 16 = .19 .56 .94 1.31 1.69 2.06 2.44 2.81
    np.testing.assert_array_equal(UniformSegments(8)(10, 13, jitter=False), [10, 10, 10, 11, 11, 12, 12, 12])
    # 4 frames, 8 samples: each frame exactly twice
    np.testing.assert_array_equal(UniformSegments(8)(0, 4, jitter=False), [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(UniformSegments(4)(7, 8, jitter=False), [7, 7, 7, 7])
    # training: the same rule, no jitter, nothing padded
    for _ in range(20):
        np.testing.assert_array_equal(UniformSegments(8)(10, 13, jitter=True), [10, 10, 10, 11, 11, 12, 12, 12])


def test_training_draws_one_frame_inside_each_segment():
    torch.manual_seed(0)
    sampler = UniformSegments(4)
    # [3, 13): segments [0, 2.5) [2.5, 5) [5, 7.5) [7.5, 10) -> frames {0,1,2} {2,3,4} {5,6,7} {7,8,9}
    allowed = [{3, 4, 5}, {5, 6, 7}, {8, 9, 10}, {10, 11, 12}]
    seen = [set() for _ in range(4)]
    for _ in range(400):
        idx = sampler(3, 13, jitter=True)
        assert (np.diff(idx) >= 0).all()
        for k, i in enumerate(idx):
            assert i in allowed[k], (k, idx)
            seen[k].add(int(i))
    assert seen == allowed  # every frame of a segment can be drawn


def test_training_jitter_follows_the_torch_seed():
    """Worker seeding (torch) makes training sampling reproducible."""
    torch.manual_seed(123)
    a = [UniformSegments(8)(0, 24, jitter=True) for _ in range(5)]
    torch.manual_seed(123)
    b = [UniformSegments(8)(0, 24, jitter=True) for _ in range(5)]
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert len({tuple(x) for x in a}) > 1


def test_min_frames_is_an_error_naming_the_clip():
    with pytest.raises(DataError, match=r"clip 'target_arm_wave_004' has 5 frames, fewer than data.frames.min_frames=6"):
        UniformSegments(8, min_frames=6)(10, 15, jitter=False, clip_id="target_arm_wave_004")
    # exactly min_frames is fine: 5 frames, centres (2k + 1) * 5 / 16 = .31 .94 1.56 2.19 2.81 3.44 4.06 4.69
    np.testing.assert_array_equal(UniformSegments(8, min_frames=5)(10, 15, jitter=False), [10, 10, 11, 12, 12, 13, 14, 14])
    with pytest.raises(ConfigError, match="num_frames must be >= 1"):
        UniformSegments(0)


# ------------------------------------------------------------------------------------------------
# ClipParams / ClipAugmentation / crop_resize
# ------------------------------------------------------------------------------------------------


def test_evaluation_crop_is_the_largest_centred_square():
    aug = ClipAugmentation()
    assert aug.sample(1.0, train=False) == ClipParams(0.0, 0.0, 1.0, 1.0, False)
    wide = aug.sample(456 / 256, train=False)  # EPIC frames: 256 x 456
    assert wide.box(256, 456) == (0, 100, 256, 256)
    tall = aug.sample(0.5, train=False)
    assert tall.box(200, 100) == (50, 0, 100, 100)
    assert not wide.flip and not tall.flip


def test_training_crops_are_squares_of_the_requested_area_inside_the_frame():
    torch.manual_seed(0)
    aug = ClipAugmentation(min_scale=0.36, flip_prob=0.25)
    H, W = 256, 456
    flips, areas = 0, []
    for _ in range(500):
        p = aug.sample(W / H, train=True)
        assert 0 <= p.top and p.top + p.height <= 1 + 1e-9
        assert 0 <= p.left and p.left + p.width <= 1 + 1e-9
        assert p.height * H == pytest.approx(p.width * W)  # square in pixels
        areas.append((p.height * H) ** 2 / H**2)  # fraction of the largest square (256 x 256)
        flips += p.flip
    assert 0.36 - 1e-9 <= min(areas) < 0.45 and 0.9 < max(areas) <= 1.0
    assert 80 <= flips <= 170  # binomial(500, 0.25): mean 125, sd 9.7


def test_crop_resize_crops_the_box_and_flips():
    img = torch.arange(16.0).view(1, 1, 4, 4)
    box = ClipParams(top=0.25, left=0.5, height=0.5, width=0.5)
    np.testing.assert_array_equal(crop_resize(img, box, 2)[0, 0].numpy(), [[6, 7], [10, 11]])
    flipped = ClipParams(top=0.25, left=0.5, height=0.5, width=0.5, flip=True)
    np.testing.assert_array_equal(crop_resize(img, flipped, 2)[0, 0].numpy(), [[7, 6], [11, 10]])
    # up-sampling a constant stays constant; 2x nearest of the box duplicates pixels
    np.testing.assert_array_equal(crop_resize(img, box, 4, mode="nearest")[0, 0, 0].numpy(), [6, 6, 7, 7])


def test_transform_keypoints_uses_the_pixel_centre_convention():
    # box rows/cols [16, 48) of a 64 frame resized to 64: scale 2 about pixel centres
    p = ClipParams(0.25, 0.25, 0.5, 0.5)
    xy = torch.tensor([[16.0, 16.0], [47.0, 20.0], [31.5, 31.5]])
    out = transform_keypoints(xy, p, (64, 64), 64)
    np.testing.assert_allclose(out.numpy(), [[0.5, 0.5], [62.5, 8.5], [31.5, 31.5]])
    out = transform_keypoints(xy, ClipParams(0.25, 0.25, 0.5, 0.5, True), (64, 64), 64)
    np.testing.assert_allclose(out.numpy(), [[62.5, 0.5], [0.5, 8.5], [31.5, 31.5]])


def test_gaussian_heatmaps_peak_at_the_keypoint_weighted_by_confidence():
    xy = torch.tensor([[[10.0, 20.0], [3.4, 50.6]]])  # (T=1, J=2, 2)
    w = torch.tensor([[1.0, 0.5]])
    h = gaussian_heatmaps(xy, w, 64, sigma=2.0)
    assert h.shape == (2, 1, 64, 64)
    assert h[0, 0, 20, 10] == pytest.approx(1.0) and h[0, 0].argmax() == 20 * 64 + 10
    assert h[1, 0].argmax() == 51 * 64 + 3 and h[1, 0].max() < 0.5
    # value one sigma away along x: exp(-1/2)
    assert h[0, 0, 20, 12] == pytest.approx(np.exp(-0.5), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# per-modality semantics
# ------------------------------------------------------------------------------------------------


def test_rgb_normalisation(bound):
    rgb = bound["rgb"]
    raw = np.full((2, 64, 64, 3), 180, np.uint8)
    out = rgb.to_tensor(raw, FULL)
    assert out.shape == (3, 2, 64, 64)
    torch.testing.assert_close(out, torch.full_like(out, (180 / 255 - 0.45) / 0.225))


def test_flow_displacements_scale_with_the_resize_and_flip_negates_x(make_modalities):
    flow = make_modalities(flow={"size": 64, "scale": 1.0})["flow"]
    raw = np.zeros((3, 32, 32, 2), np.float32)
    raw[..., 0], raw[..., 1] = 1.5, -0.5
    cases = {  # params: expected (u, v) in output pixels; 32 -> 64 is x2, a half-size box x4
        FULL: (3.0, -1.0),
        FULL_FLIP: (-3.0, -1.0),
        ClipParams(0.25, 0.25, 0.5, 0.5): (6.0, -2.0),
        ClipParams(0.0, 0.5, 0.5, 0.5, True): (-6.0, -2.0),
    }
    for params, (u, v) in cases.items():
        out = flow.to_tensor(raw, params)
        assert out.shape == (2, 3, 64, 64)
        torch.testing.assert_close(out[0], torch.full((3, 64, 64), u))
        torch.testing.assert_close(out[1], torch.full((3, 64, 64), v))
    # the config's scale divides the result
    default = make_modalities("flow")["flow"]
    assert default.scale == 4.0
    torch.testing.assert_close(default.to_tensor(raw, FULL)[0], torch.full((3, 64, 64), 3.0 / 4))


def test_flipped_flow_is_the_mirrored_field_with_x_negated(make_modalities):
    flow = make_modalities(flow={"size": 32, "scale": 1.0})["flow"]
    rng = np.random.default_rng(0)
    raw = rng.normal(0, 2, size=(4, 32, 32, 2)).astype(np.float32)
    plain, flipped = flow.to_tensor(raw, FULL), flow.to_tensor(raw, FULL_FLIP)
    torch.testing.assert_close(plain, torch.from_numpy(raw).permute(3, 0, 1, 2))  # identity at the same size
    torch.testing.assert_close(flipped[0], -plain[0].flip(-1))
    torch.testing.assert_close(flipped[1], plain[1].flip(-1))


def _moving_square(T: int, res: int, x0: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    """A bright square moving right by ``step`` pixels per frame (rgb at ``res``) and its flow at
    half resolution (frame i: the displacement from frame i to i + 1)."""
    rgb = np.full((T, res, res, 3), 40, np.uint8)
    half = res // 2
    flow = np.zeros((T, half, half, 2), np.float32)
    for t in range(T):
        x = int(x0 + step * t)
        rgb[t, 20:30, x : x + 10] = 230
        flow[t, 10:15, x // 2 : x // 2 + 5, 0] = step / 2
    return rgb, flow


def _centroid_x(img: torch.Tensor) -> float:
    w = (img - img.min()).clamp(min=0)
    cols = torch.arange(img.shape[-1], dtype=torch.float32)
    return float((w.sum(0) * cols).sum() / w.sum())


@pytest.mark.parametrize("params", [FULL, FULL_FLIP, ClipParams(0.125, 0.0, 0.75, 0.75, True)])
def test_transformed_flow_predicts_the_motion_of_the_transformed_rgb(bound, make_modalities, params):
    """Same params for both streams: the output flow at the square equals the motion of the
    square between consecutive output RGB frames, in output pixels, flip included."""
    rgb = bound["rgb"]
    flow = make_modalities(flow={"size": 64, "scale": 1.0})["flow"]
    frames, fl = _moving_square(T=4, res=64, x0=6, step=4)
    x_rgb = rgb.to_tensor(frames, params)[0]  # (T, 64, 64), red channel
    x_flow = flow.to_tensor(fl, params)[0]  # (T, 64, 64), x displacement
    for t in range(3):
        motion = _centroid_x(x_rgb[t + 1]) - _centroid_x(x_rgb[t])
        inside = x_flow[t][x_flow[t].abs() > 0.5 * abs(motion)]
        assert inside.numel() > 20
        assert float(inside.median()) == pytest.approx(motion, abs=0.3)
    sign = -1 if params.flip else 1
    gain = 64 / (params.width * 64)
    assert motion == pytest.approx(sign * 4 * gain, abs=0.3)


def test_flip_permutation_swaps_left_and_right_joints(tiny_dataset):
    meta = DatasetFolder.open(tiny_dataset).meta
    assert meta.joints[:3] == ["head", "neck", "pelvis"]
    perm = meta.flip_permutation()
    assert perm == [0, 1, 2, 6, 7, 8, 3, 4, 5, 12, 13, 14, 9, 10, 11]
    for i, j in enumerate(perm):
        a, b = meta.joints[i], meta.joints[j]
        assert a == b or {a.split("_", 1)[0], b.split("_", 1)[0]} == {"left", "right"}
        assert a.split("_", 1)[-1] == b.split("_", 1)[-1]


def test_flipped_keypoints_are_mirrored_and_swap_left_and_right(bound):
    kp = bound["pose_keypoints"]
    names = kp.meta.joints
    raw = np.zeros((1, 15, 3), np.float32)
    raw[0, :, :2], raw[0, :, 2] = 32.0, 1.0
    raw[0, names.index("head")] = (32, 5, 1.0)
    raw[0, names.index("left_wrist")] = (10, 20, 0.9)
    raw[0, names.index("right_wrist")] = (50, 30, 0.4)
    out = kp.to_tensor(raw, FULL_FLIP)  # (3, T, J): x, y in [-1, 1] of the 64 grid, confidence
    assert out.shape == (3, 1, 15)

    def norm(v: float) -> float:
        return (v + 0.5) / 64 * 2 - 1

    # the mirrored right wrist (x -> 63 - 50) is now the left wrist, with its confidence
    np.testing.assert_allclose(out[:, 0, names.index("left_wrist")].numpy(), [norm(13), norm(30), 0.4], rtol=1e-6)
    np.testing.assert_allclose(out[:, 0, names.index("right_wrist")].numpy(), [norm(53), norm(20), 0.9], rtol=1e-6)
    np.testing.assert_allclose(out[:, 0, names.index("head")].numpy(), [norm(31), norm(5), 1.0], rtol=1e-6)
    plain = kp.to_tensor(raw, FULL)
    np.testing.assert_allclose(plain[:, 0, names.index("left_wrist")].numpy(), [norm(10), norm(20), 0.9], rtol=1e-6)


def _blob_image(x: float, y: float, size: int = 64, sigma: float = 2.0) -> np.ndarray:
    g = np.arange(size)
    blob = np.exp(-((g[None, :] - x) ** 2 + (g[:, None] - y) ** 2) / (2 * sigma**2))
    return np.repeat((30 + 200 * blob)[None, ..., None], 3, axis=-1).astype(np.uint8)  # (1, S, S, 3)


def _argmax_xy(img: torch.Tensor) -> np.ndarray:
    i = int(img.argmax())
    return np.array([i % img.shape[-1], i // img.shape[-1]])


def test_keypoint_on_the_brightest_pixel_stays_on_it_and_its_heatmap_peak(bound):
    """A blob drawn at a keypoint; RGB and pose transformed with the same params: the RGB peak,
    the transformed keypoint and the heatmap peak coincide (within a pixel)."""
    rgb, pose = bound["rgb"], bound["pose"]
    names = pose.meta.joints
    torch.manual_seed(0)
    aug = ClipAugmentation(min_scale=0.4, flip_prob=0.5)
    rng = np.random.default_rng(1)
    flips = 0
    for _ in range(12):
        params = aug.sample(1.0, train=True)
        flips += params.flip
        # a keypoint inside the crop, away from its border
        t, left, h, w = params.box(64, 64)
        x, y = rng.uniform(left + 4, left + w - 5), rng.uniform(t + 4, t + h - 5)
        image = _blob_image(x, y)
        kp = np.zeros((1, 15, 3), np.float32)
        kp[..., :2], kp[..., 2] = 32.0, 1.0
        kp[0, names.index("left_wrist")] = (x, y, 1.0)
        peak_rgb = _argmax_xy(rgb.to_tensor(image, params)[0, 0])
        expected = transform_keypoints(torch.tensor([x, y]), params, (64, 64), 64).numpy()
        assert np.abs(peak_rgb - expected).max() <= 1.0, (params, peak_rgb, expected)
        heat = pose.to_tensor(kp, params)  # (J, T, S, S)
        channel = names.index("right_wrist" if params.flip else "left_wrist")
        assert heat[channel, 0].max() > 0.9
        assert np.abs(_argmax_xy(heat[channel, 0]) - peak_rgb).max() <= 1
        assert (_argmax_xy(heat[channel, 0]) == np.round(expected)).all()
    assert 0 < flips < 12  # both cases exercised


def test_depth_is_metres_over_max_depth(bound):
    depth = bound["depth"]
    assert depth.units_per_meter == 1000.0  # from meta.json
    raw = np.full((2, 32, 32), 2000, np.uint16)  # 2 m in millimetres
    out = depth.to_tensor(raw, FULL)
    assert out.shape == (1, 2, 64, 64)
    torch.testing.assert_close(out, torch.full_like(out, 2.0 / 10.0))


def _centroid(img: torch.Tensor) -> np.ndarray:
    """Intensity-weighted centroid (x, y) of a (H, W) image above its minimum."""
    w = img - img.min()
    ys, xs = torch.meshgrid(torch.arange(img.shape[0]), torch.arange(img.shape[1]), indexing="ij")
    return np.array([float((w * xs).sum() / w.sum()), float((w * ys).sum() / w.sum())])


def test_streams_stored_at_different_resolutions_stay_aligned(bound):
    """Crop boxes are fractions of the frame: a rectangle stored at 64 px (rgb) and at 32 px
    (depth) covers the same output pixels after any crop / flip. (Rounding the box to whole
    pixels of each stream, as an earlier version did, misaligned them by up to 2.5 px.)"""
    rgb, depth = bound["rgb"], bound["depth"]
    frames = np.full((1, 64, 64, 3), 20, np.uint8)
    frames[0, 20:36, 36:52] = 250
    d = np.full((1, 32, 32), 8000, np.uint16)
    d[0, 10:18, 18:26] = 1000
    torch.manual_seed(0)
    aug = ClipAugmentation(min_scale=0.5)
    ious, offsets = [], []
    for _ in range(20):
        p = aug.sample(1.0, train=True)
        a = rgb.to_tensor(frames, p)[0, 0] > 0
        b = depth.to_tensor(d, p)[0, 0] < 0.45
        if a.sum() < 20:  # rectangle (mostly) cropped away
            continue
        ious.append(float((a & b).sum() / (a | b).sum()))
        if p.box(64, 64)[1] <= 36 and sum(p.box(64, 64)[1::2]) >= 52 and p.box(64, 64)[0] <= 20 and sum(p.box(64, 64)[::2]) >= 36:
            # rectangle wholly inside the crop: compare sub-pixel centroids of the two streams
            c_rgb = _centroid(rgb.to_tensor(frames, p)[0, 0])
            c_depth = _centroid(-depth.to_tensor(d, p)[0, 0])
            offsets.append(np.abs(c_rgb - c_depth).max())
        # the mis-aligned alternative (depth not flipped) does not match when the crop is flipped
        if p.flip:
            b_wrong = b.flip(-1)
            assert float((a & b_wrong).sum() / (a | b_wrong).sum()) < 0.7
    assert len(ious) >= 8 and len(offsets) >= 4
    assert min(ious) > 0.85
    assert max(offsets) < 0.25  # output pixels


def test_flip_on_real_clips_mirrors_every_modality_with_its_semantics(tiny_dataset, bound):
    """On a generated clip: a flipped full-frame view equals the mirrored plain view, with flow-x
    negated and pose heatmaps of left/right joints swapped."""
    folder = DatasetFolder.open(tiny_dataset)
    rec = folder.records[10]
    idx = UniformSegments(8)(rec.start_frame, rec.end_frame, jitter=False)
    perm = folder.meta.flip_permutation()
    out = {k: (m(rec, idx, FULL), m(rec, idx, FULL_FLIP)) for k, m in bound.items()}
    for k in ("rgb", "depth"):
        plain, flipped = out[k]
        torch.testing.assert_close(flipped, plain.flip(-1))
    plain, flipped = out["flow"]
    torch.testing.assert_close(flipped[0], -plain[0].flip(-1))
    torch.testing.assert_close(flipped[1], plain[1].flip(-1))
    plain, flipped = out["pose"]
    torch.testing.assert_close(flipped, plain[perm].flip(-1), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(flipped, plain.flip(-1), atol=1e-3)  # the swap matters
    plain, flipped = out["pose_keypoints"]
    torch.testing.assert_close(flipped[0], -plain[0][:, perm], atol=1e-6, rtol=1e-5)  # x in [-1, 1]
    torch.testing.assert_close(flipped[1:], plain[1:][:, :, perm])


def test_pose_keypoints_fall_on_the_figure_in_depth_after_random_crops(tiny_dataset, bound):
    """Integration on generated data: confident torso keypoints (rgb/pose 64 px) land on figure
    pixels of the depth map (stored at 32 px) after the same random crop / flip."""
    folder = DatasetFolder.open(tiny_dataset)
    kp_mod, depth = bound["pose_keypoints"], bound["depth"]
    names = folder.meta.joints
    torso = [names.index("neck"), names.index("pelvis")]
    torch.manual_seed(0)
    aug = ClipAugmentation(min_scale=0.6)
    hits = total = wrong_hits = 0
    for rec in folder.records[::4]:
        idx = UniformSegments(4)(rec.start_frame, rec.end_frame, jitter=False)
        p = aug.sample(1.0, train=True)
        kp = kp_mod(rec, idx, p)  # (3, T, J)
        dm = depth(rec, idx, p)[0]  # (T, 64, 64), metres / 10
        px = ((kp[:2] + 1) / 2 * 64 - 0.5).round().long()  # back to output pixels
        for t in range(len(idx)):
            for j in torso:
                x, y = int(px[0, t, j]), int(px[1, t, j])
                if kp[2, t, j] < 0.5 or not (1 <= x < 63 and 1 <= y < 63):
                    continue
                total += 1
                patch = dm[t, y - 1 : y + 2, x - 1 : x + 2]
                hits += bool((patch > 0).logical_and(patch < 0.75).any())  # figure: < 7.5 m, wall 8.2 m
                wrong = dm[t, y - 1 : y + 2, 63 - x - 1 : 63 - x + 2]  # the mirrored position
                wrong_hits += bool((wrong > 0).logical_and(wrong < 0.75).any())
    assert total >= 40
    assert hits / total > 0.9
    assert wrong_hits / total < hits / total - 0.2


def test_colour_jitter_by_hand():
    from mmfsar.data.transforms import ColourParams, colour_jitter

    pixel = torch.tensor([0.8, 0.4, 0.2]).view(1, 3, 1, 1)
    luma = 0.299 * 0.8 + 0.587 * 0.4 + 0.114 * 0.2  # 0.4968
    assert torch.allclose(colour_jitter(pixel, ColourParams()), pixel, atol=1e-6), "no jitter: unchanged"
    grey = colour_jitter(pixel, ColourParams(grayscale=True))
    assert torch.allclose(grey, torch.full_like(pixel, luma), atol=1e-6)
    half = colour_jitter(pixel, ColourParams(saturation=0.5))
    assert torch.allclose(half, luma + 0.5 * (pixel - luma), atol=1e-6)
    assert torch.allclose(colour_jitter(pixel, ColourParams(brightness=1.5)), (1.5 * pixel).clamp(0, 1), atol=1e-6)
    # a hue rotation keeps the luma (of a colour that stays in range), and a full turn is the identity
    mild = torch.tensor([0.6, 0.5, 0.4]).view(1, 3, 1, 1)
    turned = colour_jitter(mild, ColourParams(hue=0.25))
    assert not torch.allclose(turned, mild, atol=1e-2)
    assert (turned * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum().item() == pytest.approx(0.5185, abs=1e-5)
    assert torch.allclose(colour_jitter(pixel, ColourParams(hue=1.0)), pixel, atol=1e-5)
    # contrast scales about the clip's mean luma
    two = torch.stack([torch.full((3, 1, 1), 0.2), torch.full((3, 1, 1), 0.6)])
    assert torch.allclose(colour_jitter(two, ColourParams(contrast=2.0)), torch.stack([torch.zeros(3, 1, 1), torch.full((3, 1, 1), 0.8)]), atol=1e-6)


def test_colour_jitter_is_drawn_only_when_asked_and_only_colour_streams_apply_it(tiny_dataset, make_modalities):
    from mmfsar.data.transforms import ClipAugmentation

    plain = ClipAugmentation().sample(1.0, train=True, generator=torch.Generator().manual_seed(3))
    jittered = ClipAugmentation(hue=0.5, saturation=1.0).sample(1.0, train=True, generator=torch.Generator().manual_seed(3))
    assert plain.colour is None and jittered.colour is not None
    assert (plain.top, plain.left, plain.flip) == (jittered.top, jittered.left, jittered.flip), "the crop draws do not change"
    assert -0.5 <= jittered.colour.hue <= 0.5 and 0.5 <= jittered.colour.saturation <= 2.0
    from mmfsar.data.meta import DatasetFolder

    folder = DatasetFolder.open(tiny_dataset)
    mods = {k: m.bind(folder) for k, m in make_modalities("rgb", "flow").items()}
    rec = folder.records[0]
    frames = np.arange(4)
    for name, m in mods.items():
        a, b = m(rec, frames, plain), m(rec, frames, jittered)
        assert torch.equal(a, b) == (name == "flow"), name
