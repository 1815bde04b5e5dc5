"""Tests for the two-view SSL augmentation (scripts/transforms/two_view.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.transforms import Compose
from monai.utils import set_determinism

from scripts.transforms.two_view import TwoViewAugmentd

IDENTITY_NORM: dict[str, Any] = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
GEOMETRY_ONLY: dict[str, Any] = {"jitter_prob": 0.0, "blur_prob": 0.0, **IDENTITY_NORM}


def ramp_image(height: int, width: int) -> torch.Tensor:
    """(3, H, W) image: channel 0 holds each pixel centre's x / W, channel 1 its y / H, channel 2 is 0.5."""
    ys, xs = torch.meshgrid(
        (torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij"
    )
    return torch.stack([xs, ys, torch.full_like(xs, 0.5)])


def coordinate_errors(out: dict, i: int, height: int, width: int, flip: bool | None = None) -> tuple[float, float]:
    """Max |view value - coordinate predicted from box/flip| of view i, in source pixels along x and y."""
    view, (y0, x0, y1, x1) = out[f"view{i}"], out[f"box{i}"].tolist()
    flip = bool(out[f"flip{i}"]) if flip is None else flip
    out_h, out_w = view.shape[1:]
    u, v = (torch.arange(out_w) + 0.5) / out_w, (torch.arange(out_h) + 0.5) / out_h
    x = x0 + ((1 - u) if flip else u) * (x1 - x0)
    y = y0 + v * (y1 - y0)
    err_x = (view[0] - x[None, :]).abs().max().item() * width
    err_y = (view[1] - y[:, None]).abs().max().item() * height
    return err_x, err_y


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", ["numpy", "torch", "meta"])
@pytest.mark.parametrize("spatial_size", [16, (12, 20)])
def test_output_keys_shapes_dtypes(channels: int, kind: str, spatial_size: int | tuple[int, int]) -> None:
    image = np.random.default_rng(0).random((channels, 30, 40), dtype=np.float32)
    source = {"numpy": image, "torch": torch.from_numpy(image), "meta": MetaTensor(torch.from_numpy(image))}[kind]
    out = TwoViewAugmentd("image", spatial_size=spatial_size).set_random_state(0)({"image": source, "id": 7})
    size = (spatial_size, spatial_size) if isinstance(spatial_size, int) else spatial_size
    assert set(out) == {"image", "id", "view1", "view2", "box1", "box2", "flip1", "flip2"}
    assert out["image"] is source and out["id"] == 7
    for i in (1, 2):
        view, box, flip = out[f"view{i}"], out[f"box{i}"], out[f"flip{i}"]
        assert type(view) is torch.Tensor and view.shape == (3, *size) and view.dtype == torch.float32
        assert box.shape == (4,) and box.dtype == torch.float32
        assert flip.shape == () and flip.dtype == torch.bool
        assert torch.isfinite(view).all()


def test_custom_keys_drop_source_and_single_channel_output() -> None:
    t = TwoViewAugmentd(
        "img", spatial_size=8, out_channels=1, mean=(0.5,), std=(0.25,), view_keys=("a", "b"),
        box_keys=("ba", "bb"), flip_keys=("fa", "fb"), drop_source=True,
    )
    out = t({"img": np.random.rand(1, 20, 20)})
    assert set(out) == {"a", "b", "ba", "bb", "fa", "fb"}
    assert out["a"].shape == (1, 8, 8)
    assert TwoViewAugmentd("img", allow_missing_keys=True)({"other": 1}) == {"other": 1}


def test_geometry_matches_box_and_flip() -> None:
    height, width = 60, 90
    image = ramp_image(height, width)
    t = TwoViewAugmentd("image", spatial_size=(24, 40), scale=(0.05, 1.0), **GEOMETRY_ONLY).set_random_state(1)
    seen_flips = set()
    for _ in range(15):
        out = t({"image": image})
        for i in (1, 2):
            flip = bool(out[f"flip{i}"])
            seen_flips.add(flip)
            err_x, err_y = coordinate_errors(out, i, height, width)
            assert err_x < 0.75 and err_y < 0.75, (out[f"box{i}"], flip, err_x, err_y)  # interpolation only
            # the check discriminates: the opposite flip, or a box shifted by 3 source pixels, is far off
            assert coordinate_errors(out, i, height, width, flip=not flip)[0] > 5
            shifted = dict(out, **{f"box{i}": out[f"box{i}"] + torch.tensor([3 / height, 3 / width] * 2)})
            assert min(coordinate_errors(shifted, i, height, width)) > 2.5
            assert torch.allclose(out[f"view{i}"][2], torch.tensor(0.5))
    assert seen_flips == {True, False}


def test_flipped_view_mirrors_unflipped_view() -> None:
    image = {"image": torch.rand(3, 32, 32)}
    never = TwoViewAugmentd("image", spatial_size=16, flip_prob=0.0, **GEOMETRY_ONLY).set_random_state(5)(image)
    always = TwoViewAugmentd("image", spatial_size=16, flip_prob=1.0, **GEOMETRY_ONLY).set_random_state(5)(image)
    assert torch.equal(never["box1"], always["box1"]) and bool(always["flip1"]) and not bool(never["flip1"])
    assert torch.allclose(always["view1"], never["view1"].flip(-1))


def test_views_differ_and_crops_inside_image() -> None:
    t = TwoViewAugmentd("image", spatial_size=16).set_random_state(2)
    for _ in range(10):
        out = t({"image": torch.rand(1, 40, 30)})
        assert not torch.equal(out["view1"], out["view2"])
        for box in (out["box1"], out["box2"]):
            y0, x0, y1, x1 = box.tolist()
            assert 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1


def test_crop_sampling_scale_ratio_and_flip_frequency() -> None:
    height, width, scale, ratio = 400, 500, (0.25, 1.0), (3 / 4, 4 / 3)
    t = TwoViewAugmentd("image", scale=scale, ratio=ratio, flip_prob=0.3).set_random_state(3)
    flips, areas = [], []
    for _ in range(1000):
        t.randomize((height, width))
        for p in t.params:
            top, left, h, w = p.crop
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
            areas.append(h * w / (height * width))
            flips.append(p.flip)
    assert scale[0] * 0.99 <= min(areas) and max(areas) <= scale[1]
    assert min(areas) < 0.3 and max(areas) > 0.9  # the range is covered
    assert abs(np.mean(flips) - 0.3) < 0.04


def test_crop_fallback_is_centred() -> None:
    # an aspect ratio of 4..5 never fits at 90-100 % of a square image: torchvision's centre crop fallback
    t = TwoViewAugmentd("image", spatial_size=8, scale=(0.9, 1.0), ratio=(4.0, 5.0)).set_random_state(0)
    out = t({"image": torch.rand(1, 40, 40)})
    assert torch.allclose(out["box1"], torch.tensor([0.375, 0.0, 0.625, 1.0]))  # h = round(40 / 4) = 10


def test_jitter_and_blur_keep_range_and_constant_images() -> None:
    t = TwoViewAugmentd("image", spatial_size=12, jitter_prob=1.0, blur_prob=1.0, **IDENTITY_NORM)
    t.set_random_state(4)
    for _ in range(10):
        out = t({"image": torch.rand(3, 30, 30)})
        assert out["view1"].min() >= 0 and out["view1"].max() <= 1
        # a constant grey image stays constant (no dark borders from blur or anti-aliasing padding)
        grey = t({"image": torch.full((1, 30, 30), 0.5)})["view1"]
        assert torch.allclose(grey, grey.flatten()[0], atol=1e-5) and 0.3 - 1e-5 <= grey[0, 0, 0] <= 0.7 + 1e-5
    plain = TwoViewAugmentd("image", spatial_size=12, **GEOMETRY_ONLY).set_random_state(4)
    image = {"image": torch.rand(3, 30, 30)}
    assert not torch.allclose(t.set_random_state(4)(image)["view1"], plain(image)["view1"])


def test_imagenet_normalisation() -> None:
    out = TwoViewAugmentd("image", spatial_size=8, jitter_prob=0.0, blur_prob=0.0)({"image": torch.ones(1, 16, 16)})
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(out["view1"], expected[:, None, None].expand(3, 8, 8), atol=1e-5)


def test_reproducible_with_seed() -> None:
    image = {"image": np.random.default_rng(0).random((1, 32, 48), dtype=np.float32)}

    def run(seed: int) -> dict:
        return Compose([TwoViewAugmentd("image", spatial_size=16)]).set_random_state(seed)(image)

    a, b, c = run(0), run(0), run(1)
    for key in ("view1", "view2", "box1", "box2", "flip1", "flip2"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["view1"], c["view1"]) and not torch.equal(a["box1"], c["box1"])


def make_loader(batch_size: int = 4) -> DataLoader:
    rng = np.random.default_rng(0)
    data = [{"image": rng.random((1 + 2 * (n % 2), 30 + n, 40), dtype=np.float32)} for n in range(8)]
    transform = Compose([TwoViewAugmentd("image", spatial_size=(16, 24), drop_source=True)])
    return DataLoader(Dataset(data, transform=transform), batch_size=batch_size, num_workers=0)


def test_dataset_and_dataloader_batches() -> None:
    batches = list(make_loader())
    assert len(batches) == 2
    for batch in batches:
        for i in (1, 2):
            assert batch[f"view{i}"].shape == (4, 3, 16, 24) and batch[f"view{i}"].dtype == torch.float32
            assert batch[f"box{i}"].shape == (4, 4) and batch[f"box{i}"].dtype == torch.float32
            assert batch[f"flip{i}"].shape == (4,) and batch[f"flip{i}"].dtype == torch.bool


def test_set_determinism_makes_dataloader_reproducible() -> None:
    try:
        set_determinism(seed=0)
        first = next(iter(make_loader()))
        set_determinism(seed=0)
        second = next(iter(make_loader()))
        set_determinism(seed=1)
        third = next(iter(make_loader()))
    finally:
        set_determinism(seed=None)
    assert torch.equal(first["view1"], second["view1"]) and torch.equal(first["box2"], second["box2"])
    assert not torch.equal(first["view1"], third["view1"])


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.random.rand(32, 32), r"'image'.*\(32, 32\)"),
        (np.random.rand(1, 1, 32, 32), r"'image'.*\(1, 1, 32, 32\)"),
        (np.random.rand(2, 32, 32), r"'image'.*\(2, 32, 32\)"),
        (np.random.rand(3, 1, 32), r"'image'.*\(3, 1, 32\)"),
        (np.full((1, 8, 8), np.nan), r"'image'.*\(1, 8, 8\).*NaN"),
        (torch.tensor([[[0.0, float("inf")], [0.0, 0.0]]]), r"'image'.*\(1, 2, 2\).*Inf"),
    ],
)
def test_bad_images_raise(image: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TwoViewAugmentd("image", spatial_size=8)({"image": image})


def test_three_channels_into_one_raises() -> None:
    with pytest.raises(ValueError, match=r"'image'.*\(3, 8, 8\).*out_channels"):
        TwoViewAugmentd("image", out_channels=1, mean=(0.5,), std=(0.5,))({"image": np.random.rand(3, 8, 8)})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": (0.0, 1.0)}, "scale"),
        ({"scale": (0.5, 1.2)}, "scale"),
        ({"scale": (0.8, 0.5)}, "scale"),
        ({"ratio": (0.0, 1.0)}, "ratio"),
        ({"ratio": (-1.0, 1.0)}, "ratio"),
        ({"ratio": (2.0, 1.0)}, "ratio"),
        ({"flip_prob": 1.5}, "flip_prob"),
        ({"jitter_prob": -0.1}, "jitter_prob"),
        ({"blur_prob": 2.0}, "blur_prob"),
        ({"brightness": -0.1}, "brightness"),
        ({"blur_sigma": (0.0, 1.0)}, "blur_sigma"),
        ({"spatial_size": 0}, "spatial_size"),
        ({"out_channels": 2}, "out_channels"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (1.0, 1.0, 1.0, 1.0)}, "std"),
        ({"std": (1.0, 0.0, 1.0)}, "std"),
        ({"keys": ("image", "label")}, "one key"),
        ({"view_keys": ("v", "v")}, "distinct"),
    ],
)
def test_bad_constructor_values_raise(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TwoViewAugmentd(**{"keys": "image", **kwargs})
