"""Tests for the batched two-view augmentation (scripts/transforms/batch_two_view.py) against the per-sample
TwoViewAugmentd, and for its place in configs/pretrain.json."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from conftest import REPO_ROOT
from scripts.objective.geometry import crop_grid
from scripts.transforms.batch_two_view import (
    BatchTwoViewAugment,
    PrepareTwoViewBatch,
    ViewParameters,
    collate_sources,
    dataset_transform,
    gaussian_blur,
    source_transform,
)
from scripts.transforms.two_view import TwoViewAugmentd, _smooth

IDENTITY_NORM: dict[str, Any] = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
GEOMETRY_ONLY: dict[str, Any] = {"jitter_prob": 0.0, "blur_prob": 0.0, **IDENTITY_NORM}


def smooth_image(height: int, width: int) -> torch.Tensor:
    """(3, H, W) low-frequency colour image in [0, 1]."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    return torch.stack([0.5 + 0.4 * torch.sin(3 * xs + 2 * ys), 0.5 + 0.3 * torch.cos(4 * ys), 0.3 + 0.5 * xs * ys])


def ramp_image(height: int, width: int) -> torch.Tensor:
    """(3, H, W): channel 0 holds each pixel centre's x / W, channel 1 its y / H, channel 2 is 0.5."""
    ys, xs = torch.meshgrid((torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij")
    return torch.stack([xs, ys, torch.full_like(xs, 0.5)])


def per_sample_views(transform: TwoViewAugmentd, image: torch.Tensor) -> tuple[dict, ViewParameters]:
    """TwoViewAugmentd's output for ``image`` and the parameters it drew, as ViewParameters of its 2 views."""
    out = transform({"image": image})
    params = transform.params
    return out, ViewParameters(
        torch.tensor([p.crop for p in params]), torch.tensor([p.flip for p in params]),
        torch.tensor([p.jitter or (1.0, 1.0, 1.0) for p in params]), torch.tensor([p.sigma or 0.0 for p in params]),
    )


@pytest.mark.parametrize("size", [(24, 32), (40, 20)])
def test_same_crops_and_flips_give_the_per_sample_views(size: tuple[int, int]) -> None:
    # geometry only: identical inside the crop, up to interpolation at its border (the batched resampling reads
    # the source's pixels just outside the crop where the per-sample one repeats the crop's edge)
    image = torch.rand(3, 60, 80, generator=torch.Generator().manual_seed(0))
    per_sample = TwoViewAugmentd("image", spatial_size=size, **GEOMETRY_ONLY).set_random_state(1)
    batched = BatchTwoViewAugment(spatial_size=size, **GEOMETRY_ONLY)
    flips = set()
    for _ in range(8):
        out, params = per_sample_views(per_sample, image)
        views = batched.views(image[None].expand(2, -1, -1, -1), params)
        for i in range(2):
            difference = (views[i] - out[f"view{i + 1}"]).abs()
            assert difference[:, 2:-2, 2:-2].max() < 1e-4
            assert difference.mean() < 0.02
            flips.add(bool(params.flips[i]))
            # the check discriminates: the opposite flip is far off
            mirrored = batched.views(image[None], params._replace(
                crops=params.crops[i:i + 1], flips=~params.flips[i:i + 1], jitter=params.jitter[i:i + 1],
                sigmas=params.sigmas[i:i + 1]))[0]
            assert (mirrored - out[f"view{i + 1}"])[:, 2:-2, 2:-2].abs().max() > 0.1
    assert flips == {True, False}


def test_full_recipe_matches_per_sample_on_a_smooth_image() -> None:
    image = smooth_image(60, 80)
    per_sample = TwoViewAugmentd("image", spatial_size=(24, 32), jitter_prob=1.0, blur_prob=1.0).set_random_state(3)
    batched = BatchTwoViewAugment(spatial_size=(24, 32))
    for _ in range(10):
        out, params = per_sample_views(per_sample, image)
        assert (params.sigmas > 0).all() and (params.jitter != 1).all()
        views = batched.views(image[None].expand(2, -1, -1, -1), params)
        for i in range(2):
            difference = (views[i] - out[f"view{i + 1}"]).abs()
            assert difference.max() < 0.03 and difference.mean() < 2e-3  # normalised units (std ~0.22)
    plain = batched.views(image[None], ViewParameters(params.crops[:1], params.flips[:1], torch.ones(1, 3),
                                                      torch.zeros(1)))
    assert (plain[0] - views[0]).abs().max() > 0.1  # jitter and blur do act


def test_boxes_and_crop_grid_locate_view_cells_in_the_source() -> None:
    height, width = 60, 90
    image = ramp_image(height, width)
    augment = BatchTwoViewAugment(spatial_size=(16, 24), scale=(0.05, 1.0), seed=4, **GEOMETRY_ONLY)
    out = augment(image[None].expand(20, -1, -1, -1))
    for i in (1, 2):
        view, boxes, flips = out[f"view{i}"], out[f"box{i}"], out[f"flip{i}"]
        grid = crop_grid(boxes, flips, view.shape[2:])  # (N, 16, 24, (y, x)) cell centres in the source
        torch.testing.assert_close(view[:, 0], grid[..., 1], atol=0.75 / width, rtol=0)
        torch.testing.assert_close(view[:, 1], grid[..., 0], atol=0.75 / height, rtol=0)
        assert 0 < flips.sum() < len(flips)
        mirrored = crop_grid(boxes, ~flips, view.shape[2:])
        assert (view[:, 0] - mirrored[..., 1]).abs().amax() > 0.1  # the check discriminates


def test_same_parameters_give_the_per_sample_boxes_and_cell_centres() -> None:
    image = smooth_image(60, 90)
    per_sample = TwoViewAugmentd("image", spatial_size=(16, 24), **GEOMETRY_ONLY).set_random_state(2)
    batched = BatchTwoViewAugment(spatial_size=(16, 24), **GEOMETRY_ONLY)
    for _ in range(5):
        out, params = per_sample_views(per_sample, image)
        views = iter([ViewParameters(*(value[i:i + 1] for value in params)) for i in range(2)])
        batched.sample = lambda height, width, count: next(views)  # the per-sample path's draws
        mine = batched(image[None])
        for i in (1, 2):
            torch.testing.assert_close(mine[f"box{i}"][0], out[f"box{i}"])
            assert bool(mine[f"flip{i}"][0]) == bool(out[f"flip{i}"])
            torch.testing.assert_close(crop_grid(mine[f"box{i}"], mine[f"flip{i}"], (7, 7)),
                                       crop_grid(out[f"box{i}"][None], out[f"flip{i}"][None], (7, 7)))
            assert (mine[f"view{i}"][0] - out[f"view{i}"])[:, 2:-2, 2:-2].abs().max() < 1e-4


def test_sampling_follows_two_view_augmentd() -> None:
    height, width, scale, ratio = 400, 500, (0.25, 1.0), (3 / 4, 4 / 3)
    augment = BatchTwoViewAugment(scale=scale, ratio=ratio, flip_prob=0.3, seed=3)
    params = augment.sample(height, width, 4000)
    top, left, h, w = params.crops.double().unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    areas = h * w / (height * width)
    assert scale[0] * 0.99 <= areas.min() and areas.max() <= scale[1] and areas.min() < 0.3 and areas.max() > 0.9
    aspect = w / h
    assert ratio[0] * 0.97 <= aspect.min() and aspect.max() <= ratio[1] * 1.03
    assert abs(params.flips.double().mean() - 0.3) < 0.03
    assert abs((params.jitter != 1).any(dim=1).double().mean() - 0.8) < 0.03
    brightness = params.jitter[(params.jitter != 1).any(dim=1), 0]
    assert 0.6 <= brightness.min() < 0.65 and 1.35 < brightness.max() <= 1.4
    blurred = params.sigmas[params.sigmas > 0]
    assert abs(len(blurred) / 4000 - 0.5) < 0.03 and 0.1 <= blurred.min() and blurred.max() <= 2.0
    # the same distribution as the per-sample path's (area fractions compared by their quartiles)
    per_sample = TwoViewAugmentd("image", scale=scale, ratio=ratio).set_random_state(3)
    reference = []
    for _ in range(1000):
        per_sample.randomize((height, width))
        reference += [p.crop[2] * p.crop[3] / (height * width) for p in per_sample.params]
    quartiles = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    torch.testing.assert_close(areas.quantile(quartiles), torch.tensor(reference).double().quantile(quartiles),
                               atol=0.03, rtol=0)


def test_crop_fallback_is_centred_like_the_per_sample_path() -> None:
    augment = BatchTwoViewAugment(spatial_size=8, scale=(0.9, 1.0), ratio=(4.0, 5.0), seed=0)
    out = augment(torch.rand(2, 1, 40, 40))
    torch.testing.assert_close(out["box1"], torch.tensor([[0.375, 0.0, 0.625, 1.0]] * 2))  # h = round(40 / 4)


def test_blur_equals_monai_gaussian_smooth_per_view() -> None:
    images = torch.rand(5, 3, 20, 30, generator=torch.Generator().manual_seed(1))
    sigma_y, sigma_x = torch.tensor([0.0, 0.3, 0.7, 2.0, 1.2]), torch.tensor([0.5, 0.0, 1.7, 0.1, 1.2])
    blurred = gaussian_blur(images, sigma_y, sigma_x)
    for n in range(5):
        torch.testing.assert_close(blurred[n], torch.as_tensor(_smooth(images[n], [float(sigma_y[n]),
                                                                                    float(sigma_x[n])])))
    assert gaussian_blur(images, torch.zeros(5), torch.zeros(5)) is images


@pytest.mark.parametrize("channels", [1, 3])
def test_outputs_keys_shapes_range_and_normalisation(channels: int) -> None:
    augment = BatchTwoViewAugment(spatial_size=(12, 20), seed=0)
    out = augment(torch.rand(4, channels, 30, 40))
    assert set(out) == {"view1", "view2", "box1", "box2", "flip1", "flip2"}
    for i in (1, 2):
        assert out[f"view{i}"].shape == (4, 3, 12, 20) and out[f"view{i}"].dtype == torch.float32
        assert out[f"box{i}"].shape == (4, 4) and out[f"flip{i}"].shape == (4,) and out[f"flip{i}"].dtype == torch.bool
        y0, x0, y1, x1 = out[f"box{i}"].unbind(1)
        assert ((0 <= y0) & (y0 < y1) & (y1 <= 1) & (0 <= x0) & (x0 < x1) & (x1 <= 1)).all()
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = out["view1"] * std[:, None, None] + mean[:, None, None]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    if channels == 1:  # grey stays grey through jitter and blur
        torch.testing.assert_close(pixels[:, 0], pixels[:, 2])
    constant = BatchTwoViewAugment(spatial_size=8, jitter_prob=0.0, blur_prob=1.0, seed=0)(torch.ones(2, 1, 16, 16))
    expected = (1 - mean) / std
    torch.testing.assert_close(constant["view1"], expected[None, :, None, None].expand(2, 3, 8, 8))  # no dark borders


def test_seeded_runs_are_reproducible() -> None:
    images = torch.rand(3, 1, 32, 48)
    a, b = BatchTwoViewAugment(spatial_size=16, seed=0)(images), BatchTwoViewAugment(spatial_size=16, seed=0)(images)
    c = BatchTwoViewAugment(spatial_size=16, seed=1)(images)
    for key in a:
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["view1"], c["view1"])
    torch.manual_seed(5)
    d = BatchTwoViewAugment(spatial_size=16)(images)  # no seed: torch's global generator (set_determinism)
    torch.manual_seed(5)
    assert torch.equal(d["box2"], BatchTwoViewAugment(spatial_size=16)(images)["box2"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": (0.0, 1.0)}, "scale"), ({"ratio": (2.0, 1.0)}, "ratio"), ({"flip_prob": 1.5}, "flip_prob"),
        ({"brightness": -0.1}, "brightness"), ({"blur_sigma": (0.0, 1.0)}, "blur_sigma"),
        ({"spatial_size": 0}, "spatial_size"), ({"out_channels": 2}, "out_channels"), ({"std": (1.0, 0.0, 1.0)}, "std"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BatchTwoViewAugment(**kwargs)


def test_bad_images_and_seed_raise() -> None:
    augment = BatchTwoViewAugment(spatial_size=8)
    for images in (torch.rand(2, 2, 16, 16), torch.rand(2, 1, 1, 16), np.random.rand(2, 1, 8, 8)):
        with pytest.raises(ValueError, match="images"):
            augment(images)
    with pytest.raises(TypeError, match="seed"):
        BatchTwoViewAugment(seed="0")


def test_prepare_batch_augments_on_the_device_or_moves_per_sample_views() -> None:
    prepare = PrepareTwoViewBatch(BatchTwoViewAugment(spatial_size=8, seed=0))
    view1, label, others, kwargs = prepare({"image": torch.rand(4, 1, 16, 16), "modality": ["CT"] * 4}, "cpu")
    assert view1.shape == (4, 3, 8, 8) and label is None and kwargs == {}
    assert [tuple(t.shape) for t in others] == [(4, 3, 8, 8), (4, 4), (4,), (4, 4), (4,)]
    views = TwoViewAugmentd("image", spatial_size=8, drop_source=True)({"image": torch.rand(1, 16, 16)})
    batch = {key: value[None] for key, value in views.items()}
    moved = PrepareTwoViewBatch(None)(batch, "cpu")
    assert torch.equal(moved[0], batch["view1"]) and torch.equal(moved[2][1], batch["box1"])
    with pytest.raises(ValueError, match="'image'"):
        prepare(batch, "cpu")


def test_sources_are_fixed_size_and_collate_mixed_channels() -> None:
    transform = source_transform(32)
    grey = transform({"image": torch.rand(1, 20, 50), "modality": "CT"})
    colour = transform({"image": torch.rand(3, 64, 64), "modality": "colour"})
    assert grey["image"].shape == (1, 32, 32) and type(grey["image"]) is torch.Tensor
    batch = collate_sources([grey, colour])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["modality"] == ["CT", "colour"]
    assert torch.equal(batch["image"][0, 2], grey["image"][0])
    assert collate_sources([grey, grey])["image"].shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="augmentation"):
        dataset_transform("gpu", None, 32)
    with pytest.raises(ValueError, match="source_size"):
        source_transform(1)


def config(root: Path, **overrides: Any) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(REPO_ROOT / "configs" / "pretrain.json")
    parser.update({"bundle_root": str(REPO_ROOT), "data_root": str(root), "image_size": 16, **overrides})
    return parser


@pytest.fixture(scope="module")
def embedded_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedded")


def test_config_defaults_to_the_batched_path_with_balancing_and_cache(embedded_root: Path) -> None:
    parser = config(embedded_root)
    assert parser.get_parsed_content("augmentation") == "batched"
    assert 1 <= parser.get_parsed_content("num_workers") <= 8
    dataset = parser.get_parsed_content("train#dataset")
    assert len(dataset) == 450 and set(Counter(dataset.modalities).values()) == {90}  # balanced
    duplicate = dataset[len(dataset) - 1]
    assert duplicate["image"].shape[1:] == (32, 32) and "view1" not in duplicate  # source_size = 2 x image_size
    assert dataset._cache[len(dataset) - 1] is not None  # decoded and cropped once, kept
    prepare = parser.get_parsed_content("train#prepare_batch")
    batch = collate_sources([dataset[i] for i in (0, 300, 449)])
    view1, _, (view2, box1, flip1, box2, flip2), _ = prepare(batch, torch.device("cpu"))
    assert view1.shape == view2.shape == (3, 3, 16, 16) and box1.shape == (3, 4)


def test_config_per_sample_path_is_one_override(embedded_root: Path) -> None:
    parser = config(embedded_root, augmentation="per_sample", cache_rate=0.0)
    dataset = parser.get_parsed_content("train#dataset")
    assert len(dataset) == 450 and set(Counter(dataset.modalities).values()) == {90}
    sample = dataset[len(dataset) - 1]
    assert sample["view1"].shape == (3, 16, 16) and "image" not in sample
    assert parser.get_parsed_content("train#prepare_batch").augment is None
