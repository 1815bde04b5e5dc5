"""Two-view augmentation of LVM-Med's self-supervised pretraining (random resized crop, flip, jitter, blur).

LVM-Med (Nguyen et al., NeurIPS 2023, section 4.1) follows the VICRegL recipe (Bardes et al., NeurIPS 2022):
"multi-crop ... followed by flip (probability 50%), color jitter, random Gaussian blur, and normalization".
Each view also records its crop box and flip, which the local (pixel-level) part of the objective needs to
relate locations of the two views.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import (
    Flip,
    GaussianSmooth,
    MapTransform,
    NormalizeIntensity,
    Randomizable,
    Resize,
    ScaleIntensity,
    ScaleIntensityFixedMean,
    SpatialCrop,
)
from monai.utils import convert_to_tensor, ensure_tuple_rep

__all__ = ["GREY_WEIGHTS", "IMAGENET_MEAN", "IMAGENET_STD", "TwoViewAugmentd", "check_recipe"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


class _ViewParams(NamedTuple):
    crop: tuple[int, int, int, int]  # top, left, height, width in pixels of the source image
    flip: bool
    jitter: tuple[float, float, float] | None  # brightness, contrast, saturation factors
    sigma: float | None  # blur sigma in pixels of the view


def _smooth(img: torch.Tensor, sigma: Sequence[float] | float) -> torch.Tensor:
    """MONAI Gaussian smoothing renormalised by the smoothed ones, so the zero padding does not darken borders."""
    gaussian = GaussianSmooth(sigma)
    return gaussian(img) / gaussian(torch.ones_like(img[:1]))


def check_recipe(
    spatial_size: Sequence[int] | int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    probabilities: tuple[float, float, float],
    strengths: tuple[float, float, float],
    blur_sigma: tuple[float, float],
    out_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[int, int]:
    """Validates the arguments of the two-view recipe (see :class:`TwoViewAugmentd`), shared by the batched path;
    ``probabilities`` are (flip, jitter, blur), ``strengths`` (brightness, contrast, saturation). Returns the view
    size as a pair.

    Raises:
        ValueError: naming the first bad argument and its value.
    """
    size = ensure_tuple_rep(spatial_size, 2)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"spatial_size must be a positive int or pair, got {spatial_size}.")
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < scale[0] <= scale[1] <= 1, got {scale}.")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < ratio[0] <= ratio[1], got {ratio}.")
    if len(blur_sigma) != 2 or not 0 < blur_sigma[0] <= blur_sigma[1]:
        raise ValueError(f"blur_sigma must satisfy 0 < blur_sigma[0] <= blur_sigma[1], got {blur_sigma}.")
    for name, p in zip(("flip_prob", "jitter_prob", "blur_prob"), probabilities):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {p}.")
    for name, s in zip(("brightness", "contrast", "saturation"), strengths):
        if s < 0:
            raise ValueError(f"{name} must be >= 0, got {s}.")
    if out_channels not in (1, 3):
        raise ValueError(f"out_channels must be 1 or 3, got {out_channels}.")
    if len(mean) != out_channels or len(std) != out_channels or min(std) <= 0:
        raise ValueError(f"mean and std need {out_channels} values (std > 0), got mean={mean}, std={std}.")
    return size


class TwoViewAugmentd(Randomizable, MapTransform):
    """Turn ``data[key]``, a channel-first 2D image, into two randomly augmented views for SSL.

    The recipe of LVM-Med (Nguyen et al., NeurIPS 2023, sec. 4.1), taken from VICRegL (Bardes et al.,
    NeurIPS 2022); each view is drawn independently:

    1. random resized crop (torchvision's sampling: area fraction uniform in ``scale``, log-uniform aspect
       ratio width/height in ``ratio``, 10 tries, then a centre crop), resized to ``spatial_size`` bilinearly
       (Gaussian anti-aliasing first when downsampling);
    2. horizontal flip with probability ``flip_prob``;
    3. colour jitter with probability ``jitter_prob``: brightness, contrast and saturation factors uniform in
       ``[max(0, 1 - s), 1 + s]``, applied in that order with clipping to [0, 1]; saturation only acts on
       3-channel images. Hue jitter is omitted (medical images are mostly grey);
    4. Gaussian blur with probability ``blur_prob``, sigma uniform in ``blur_sigma`` (pixels of the view);
    5. a 1-channel image is repeated to ``out_channels`` channels, then normalised by ``mean`` and ``std``.

    Outputs (besides ``data[key]``, kept unless ``drop_source``), for view ``i`` in 1, 2:

    - ``view{i}``: float32 tensor (out_channels, *spatial_size).
    - ``box{i}``: float32 tensor (4,), the crop ``(y0, x0, y1, x1)`` in the source image, divided by its
      height/width. Output column ``u`` in [0, 1] of the view comes from source ``x = x0 + u' (x1 - x0)``
      with ``u' = 1 - u`` if flipped else ``u``; row ``v`` from ``y = y0 + v (y1 - y0)``.
    - ``flip{i}``: bool tensor scalar, whether the view was flipped horizontally.

    Args:
        keys: the single key of the image, shape (C, H, W) with C in {1, 3}, values in [0, 1]
            (numpy array or torch tensor).
        spatial_size: view size (H', W'), or an int for square views.
        scale: range of the crop's area fraction, within (0, 1].
        ratio: range of the crop's aspect ratio width/height, positive.
        flip_prob: probability of a horizontal flip.
        jitter_prob: probability of colour jitter.
        brightness: brightness jitter strength, >= 0.
        contrast: contrast jitter strength, >= 0.
        saturation: saturation jitter strength, >= 0.
        blur_prob: probability of Gaussian blur.
        blur_sigma: range of the blur's sigma in pixels, positive.
        out_channels: channels of the views, 1 or 3 (a 1-channel image is repeated).
        mean: per-channel subtrahend, length out_channels.
        std: per-channel divisor, length out_channels, positive.
        view_keys: output keys of the two views.
        box_keys: output keys of the two crop boxes.
        flip_keys: output keys of the two flip flags.
        drop_source: remove ``data[key]`` from the output.
        allow_missing_keys: leave the data unchanged when the key is missing.

    Example::

        from monai.transforms import Compose, LoadImaged, ScaleIntensityd

        augment = Compose([LoadImaged("image", ensure_channel_first=True), ScaleIntensityd("image"),
                           TwoViewAugmentd("image", spatial_size=224)])
        augment.set_random_state(seed=0)
        sample = augment({"image": "chest_xray.png"})
        sample["view1"].shape, sample["box1"], sample["flip1"]  # (3, 224, 224), (y0, x0, y1, x1), bool
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        spatial_size: Sequence[int] | int = 224,
        scale: tuple[float, float] = (0.25, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_prob: float = 0.5,
        jitter_prob: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        blur_prob: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        out_channels: int = 3,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        view_keys: tuple[str, str] = ("view1", "view2"),
        box_keys: tuple[str, str] = ("box1", "box2"),
        flip_keys: tuple[str, str] = ("flip1", "flip2"),
        drop_source: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"TwoViewAugmentd takes exactly one key, got {self.keys}.")
        self.spatial_size = check_recipe(spatial_size, scale, ratio, (flip_prob, jitter_prob, blur_prob),
                                         (brightness, contrast, saturation), blur_sigma, out_channels, mean, std)
        names = [*view_keys, *box_keys, *flip_keys]
        if len(names) != 6 or len(set(names)) != 6:
            raise ValueError(f"view_keys, box_keys and flip_keys must be 6 distinct names, got {names}.")
        self.scale = (float(scale[0]), float(scale[1]))
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.flip_prob, self.jitter_prob, self.blur_prob = flip_prob, jitter_prob, blur_prob
        self.strengths = (brightness, contrast, saturation)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.out_channels = out_channels
        self.view_keys, self.box_keys, self.flip_keys = tuple(view_keys), tuple(box_keys), tuple(flip_keys)
        self.drop_source = drop_source
        self.resize = Resize(self.spatial_size, mode="bilinear", align_corners=False, dtype=torch.float32)
        self.flip = Flip(spatial_axis=1)
        self.normalize = NormalizeIntensity(subtrahend=list(mean), divisor=list(std), channel_wise=True)
        self.params: list[_ViewParams] = []

    def _sample_crop(self, height: int, width: int) -> tuple[int, int, int, int]:
        """torchvision's ``RandomResizedCrop.get_params``: (top, left, height, width)."""
        area = height * width
        for _ in range(10):
            target_area = area * self.R.uniform(*self.scale)
            aspect = math.exp(self.R.uniform(*self.log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(self.R.randint(0, height - h + 1)), int(self.R.randint(0, width - w + 1)), h, w
        ratio_lo, ratio_hi = math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
        if width / height < ratio_lo:
            w, h = width, max(1, round(width / ratio_lo))
        elif width / height > ratio_hi:
            w, h = max(1, round(height * ratio_hi)), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def randomize(self, data: tuple[int, int]) -> None:
        """Draw the parameters of both views for a source image of spatial shape ``data`` = (H, W)."""
        self.params = []
        for _ in range(2):
            crop = self._sample_crop(*data)
            flip = bool(self.R.rand() < self.flip_prob)
            jitter = None
            if self.R.rand() < self.jitter_prob:
                jitter = tuple(float(self.R.uniform(max(0.0, 1 - s), 1 + s)) for s in self.strengths)
            sigma = float(self.R.uniform(*self.blur_sigma)) if self.R.rand() < self.blur_prob else None
            self.params.append(_ViewParams(crop, flip, jitter, sigma))  # type: ignore[arg-type]

    def _jitter(self, img: torch.Tensor, factors: tuple[float, float, float]) -> torch.Tensor:
        """Brightness and contrast with MONAI; contrast scales about the mean of all channels (torchvision: of
        the grey image). Saturation (blend with the grey image) and the clipping have no MONAI transform."""
        brightness, contrast, saturation = factors
        img = ScaleIntensity(minv=None, maxv=None, factor=brightness - 1)(img).clamp(0, 1)
        img = ScaleIntensityFixedMean(factor=contrast - 1, fixed_mean=True)(img).clamp(0, 1)
        if img.shape[0] == 3:
            grey = torch.einsum("c,chw->hw", img.new_tensor(GREY_WEIGHTS), img)
            img = (saturation * img + (1 - saturation) * grey).clamp(0, 1)
        return img

    def _view(self, img: torch.Tensor, params: _ViewParams) -> torch.Tensor:
        top, left, h, w = params.crop
        view = SpatialCrop(roi_start=(top, left), roi_end=(top + h, left + w))(img)
        aa_sigma = [max(0.0, (src / dst - 1) / 2) for src, dst in zip((h, w), self.spatial_size)]
        if max(aa_sigma) > 0:  # skimage's anti-aliasing sigma, as MONAI Resize(anti_aliasing=True)
            view = _smooth(view, aa_sigma)
        view = self.resize(view)
        if params.flip:
            view = self.flip(view)
        if params.jitter is not None:
            view = self._jitter(view, params.jitter)
        if params.sigma is not None:
            view = _smooth(view, params.sigma)
        if view.shape[0] != self.out_channels:
            view = view.repeat(self.out_channels, 1, 1)
        return convert_to_tensor(self.normalize(view), dtype=torch.float32, track_meta=False)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = convert_to_tensor(d[key], dtype=torch.float32, track_meta=False)
            shape = tuple(img.shape)
            if img.ndim != 3 or shape[0] not in (1, 3) or min(shape[1:]) < 2:
                raise ValueError(f"TwoViewAugmentd: '{key}' must be (C, H, W), C in {{1, 3}}, H, W >= 2; got {shape}.")
            if shape[0] > self.out_channels:
                raise ValueError(f"TwoViewAugmentd: '{key}' of shape {shape} has more channels than out_channels=1.")
            if not torch.isfinite(img).all():
                raise ValueError(f"TwoViewAugmentd: '{key}' of shape {shape} contains NaN or Inf.")
            height, width = shape[1:]
            self.randomize((height, width))
            for i, params in enumerate(self.params):
                top, left, h, w = params.crop
                d[self.view_keys[i]] = self._view(img, params)
                box = (top / height, left / width, (top + h) / height, (left + w) / width)
                d[self.box_keys[i]] = torch.tensor(box, dtype=torch.float32)
                d[self.flip_keys[i]] = torch.tensor(params.flip)
            if self.drop_source:
                del d[key]
        return d
