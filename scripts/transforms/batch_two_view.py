"""Two-view augmentation of LVM-Med on collated batches of tensors, on the training device.

The recipe and sampling of :class:`~scripts.transforms.two_view.TwoViewAugmentd` (LVM-Med, Nguyen et al.,
NeurIPS 2023, sec. 4.1, after VICRegL, Bardes et al., NeurIPS 2022: random resized crop, flip, colour jitter,
Gaussian blur, normalisation), applied to a whole batch of equally sized sources at once: the crop, the resize
and the flip of every view are one affine resampling (an axis-aligned sampling grid and ``grid_sample``),
jitter and normalisation are element-wise, the blurs are separable with one kernel per view. It
runs in the trainer's ``prepare_batch`` (:class:`PrepareTwoViewBatch`), so the loader only hands over decoded
slices of a fixed size (:func:`source_transform`, cached by the pretraining dataset).

Written here rather than with MONAI's array transforms because those take one image and one set of random
parameters per call (the per-sample path), and torchvision's batched v2 transforms draw one set of parameters
per batch, not per view.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from monai.data import list_data_collate
from monai.transforms import Compose, EnsureTyped, Resized
from monai.utils import ensure_tuple_rep

from scripts.pretraining.model import prepare_two_view_batch
from scripts.transforms.monitor_view import three_channels
from scripts.transforms.two_view import GREY_WEIGHTS, IMAGENET_MEAN, IMAGENET_STD, check_recipe

__all__ = [
    "AUGMENTATION_MODES",
    "BatchTwoViewAugment",
    "PrepareTwoViewBatch",
    "ViewParameters",
    "collate_sources",
    "dataset_transform",
    "source_transform",
]

AUGMENTATION_MODES = ("batched", "per_sample")

_TRUNCATED = 4.0  # Gaussian kernels reach int(4 sigma + 0.5) pixels, as MONAI's GaussianSmooth


class ViewParameters(NamedTuple):
    """Random parameters of V views (CPU tensors).

    Attributes:
        crops: (V, 4) long, (top, left, height, width) in pixels of the source.
        flips: (V,) bool, horizontal flip after cropping.
        jitter: (V, 3) float, brightness, contrast and saturation factors (1 where no jitter is applied).
        sigmas: (V,) float, blur sigma in pixels of the view (0 where no blur is applied).
    """

    crops: torch.Tensor
    flips: torch.Tensor
    jitter: torch.Tensor
    sigmas: torch.Tensor


def _gaussian_kernels(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernels of MONAI's "erf" discrete Gaussian (``GaussianSmooth``'s) for (V,) sigmas on the CPU.

    Returns:
        (V, 2 R + 1) kernels, centred, and (V,) their radii: MONAI's int(4 sigma + 0.5), less the outer taps
        whose weights are below 1e-8 (no float32 pixel changes by them); radius 0 is the identity (sigma 0).
    """
    sigmas = sigmas.to(torch.float64)
    tails = (sigmas * _TRUNCATED).clamp(min=0.5).add(0.5).floor()
    radius = int(tails.max()) if sigmas.numel() else 0
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    t = 0.70710678 / sigmas.clamp(min=1e-12)[:, None]
    kernels = (0.5 * (torch.erf(t * (x + 0.5)) - torch.erf(t * (x - 0.5)))).clamp(min=0)
    kernels = kernels * (x.abs() <= tails[:, None])
    radii = ((kernels > 1e-8) * x.abs()).amax(dim=1) if sigmas.numel() else tails
    return kernels.to(torch.float32), radii.long()


def _correlate(images: torch.Tensor, kernels: torch.Tensor, axis: int) -> torch.Tensor:
    """Each view of (V, C, H, W) ``images`` filtered along ``axis`` (2: columns, 3: rows) with its own symmetric
    kernel of (V, 2 r + 1), zero-padded, then divided by the kernel mass inside the image (the border
    renormalisation). Shifted multiply-adds: on a CPU several times faster than a grouped convolution."""
    radius, size = kernels.shape[1] // 2, images.shape[axis]
    padded = F.pad(images, (radius, radius) if axis == 3 else (0, 0, radius, radius))
    weights = kernels[:, :, None, None, None]  # (V, K, 1, 1, 1)
    out = padded.narrow(axis, 0, size) * weights[:, 0]
    for tap in range(1, kernels.shape[1]):
        out.addcmul_(padded.narrow(axis, tap, size), weights[:, tap])
    inside = F.pad(kernels.new_ones(1, 1, size), (radius, radius)).unfold(2, kernels.shape[1], 1)[0, 0]
    mass = kernels @ inside.T  # (V, size): weight of the taps that fall inside the image
    return out.div_(mass[:, None, :, None] if axis == 2 else mass[:, None, None, :])


def _blur_axis(images: torch.Tensor, sigmas: torch.Tensor, axis: int) -> torch.Tensor:
    """Gaussian blur of every view along ``axis`` with its own sigma (CPU, (V,)); views are grouped by kernel
    radius so that each runs only its own taps, and views of radius 0 are left alone (``images`` itself is
    returned when no view needs a blur)."""
    kernels, radii = _gaussian_kernels(sigmas)
    centre = kernels.shape[1] // 2
    out = images
    for radius in sorted(set(radii.tolist()) - {0}):
        members = torch.nonzero(radii == radius)[:, 0]
        group = kernels[members, centre - radius:centre + radius + 1].to(images.device, non_blocking=True)
        if len(members) == images.shape[0]:
            return _correlate(images, group, axis)
        index = members.to(images.device, non_blocking=True)
        out = images.clone() if out is images else out
        out.index_copy_(0, index, _correlate(images.index_select(0, index), group, axis))
    return out


def gaussian_blur(images: torch.Tensor, sigma_y: torch.Tensor, sigma_x: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of every view with its own sigmas, renormalised by the blurred ones so that the
    zero padding does not darken borders (what ``two_view._smooth`` does with MONAI's ``GaussianSmooth``).

    Args:
        images: (V, C, H, W).
        sigma_y, sigma_x: (V,) sigmas in pixels along columns and rows, >= 0 (0: no blur along that axis), on
            the CPU (the kernels are built there and copied to the images' device, so nothing waits for it).
    """
    return _blur_axis(_blur_axis(images, sigma_y, 2), sigma_x, 3)


def _sampling_coordinates(
    crops: torch.Tensor, flips: torch.Tensor, source: tuple[int, int], view: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each view's pixel centres lie in its source, in ``grid_sample``'s coordinates (align_corners=False,
    -1 and 1 the source's outer edges): (V, H') rows and (V, W') columns of an axis-aligned affine map. Output
    column u in [0, 1] reads source x = x0 + u' (x1 - x0), u' = 1 - u if flipped; row v reads y0 + v (y1 - y0).
    """
    top, left, h, w = crops.to(torch.float32).unbind(1)
    v = (torch.arange(view[0], dtype=torch.float32) + 0.5) / view[0]
    u = (torch.arange(view[1], dtype=torch.float32) + 0.5) / view[1]
    u = torch.where(flips[:, None], 1 - u, u)
    rows = (top[:, None] + v * h[:, None]) / source[0]
    columns = (left[:, None] + u * w[:, None]) / source[1]
    return 2 * rows - 1, 2 * columns - 1


class BatchTwoViewAugment:
    """Two randomly augmented views of every image of a batch, with their crop boxes and flips.

    The recipe of :class:`~scripts.transforms.two_view.TwoViewAugmentd` with the same arguments and defaults,
    parameters drawn independently per view from the same distributions (torchvision's random resized crop
    sampling, in whole pixels of the source). Resampling is bilinear, with a Gaussian anti-aliasing blur of
    the source first where a view shrinks its crop (sigma ``(crop / view - 1) / 2`` per axis, as there); the
    only differences to the per-sample path are at the crop's border, where the resampling and the
    anti-aliasing read the source's pixels just outside the crop instead of repeating its edge.

    Randomness comes from a ``torch.Generator`` on the CPU seeded with ``seed`` (the global torch generator
    when ``seed`` is None, which ``monai.utils.set_determinism`` seeds); the few parameters per view are
    drawn there and copied to the images' device, so no step waits for the device.

    Args:
        spatial_size: view size (H', W'), or an int for square views.
        scale, ratio, flip_prob, jitter_prob, brightness, contrast, saturation, blur_prob, blur_sigma,
            out_channels, mean, std: as :class:`~scripts.transforms.two_view.TwoViewAugmentd`.
        seed: seed of the generator, or None for torch's global generator.

    Example::

        augment = BatchTwoViewAugment(spatial_size=224, seed=0)
        out = augment(images)  # images (N, C, H, W) in [0, 1], C in {1, 3}, on the CPU or a GPU
        out["view1"].shape, out["box1"].shape, out["flip1"].shape  # (N, 3, 224, 224), (N, 4), (N,)
    """

    def __init__(
        self,
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
        seed: int | None = None,
    ) -> None:
        self.spatial_size = check_recipe(spatial_size, scale, ratio, (flip_prob, jitter_prob, blur_prob),
                                         (brightness, contrast, saturation), blur_sigma, out_channels, mean, std)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TypeError(f"seed must be an int or None, got {seed!r}.")
        self.scale = (float(scale[0]), float(scale[1]))
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.flip_prob, self.jitter_prob, self.blur_prob = flip_prob, jitter_prob, blur_prob
        self.strengths = torch.tensor([brightness, contrast, saturation], dtype=torch.float64)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.out_channels = out_channels
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def _uniform(self, shape: tuple[int, ...], low: float | torch.Tensor, high: float | torch.Tensor) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=self.generator, dtype=torch.float64)

    def _sample_crops(self, height: int, width: int, count: int) -> torch.Tensor:
        """(count, 4) crops (top, left, height, width), torchvision's ``RandomResizedCrop.get_params`` per view."""
        area = height * width
        target_area = area * self._uniform((count, 10), *self.scale)
        aspect = torch.exp(self._uniform((count, 10), *self.log_ratio))
        w = torch.round(torch.sqrt(target_area * aspect))
        h = torch.round(torch.sqrt(target_area / aspect))
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # the first of the 10 tries that fits
        w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
        ratio_lo, ratio_hi = math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
        if width / height < ratio_lo:  # the centre crop when no try fits
            fallback = (max(1, round(width / ratio_lo)), width)
        elif width / height > ratio_hi:
            fallback = (height, max(1, round(height * ratio_hi)))
        else:
            fallback = (height, width)
        found = fits.any(dim=1)
        h = torch.where(found, h, float(fallback[0]))
        w = torch.where(found, w, float(fallback[1]))
        top = torch.floor(torch.rand(count, generator=self.generator, dtype=torch.float64) * (height - h + 1))
        left = torch.floor(torch.rand(count, generator=self.generator, dtype=torch.float64) * (width - w + 1))
        top = torch.where(found, top, torch.div(height - h, 2, rounding_mode="floor"))
        left = torch.where(found, left, torch.div(width - w, 2, rounding_mode="floor"))
        return torch.stack([top, left, h, w], dim=1).long()

    def sample(self, height: int, width: int, count: int) -> ViewParameters:
        """Random parameters of ``count`` views of sources of ``height`` x ``width`` pixels, on the CPU."""
        if height < 2 or width < 2 or count < 0:
            raise ValueError(f"sources must be at least 2 x 2 and count >= 0, got {height} x {width}, count {count}.")
        crops = self._sample_crops(height, width, count)
        flips = torch.rand(count, generator=self.generator) < self.flip_prob
        jittered = torch.rand(count, generator=self.generator) < self.jitter_prob
        factors = self._uniform((count, 3), (1 - self.strengths).clamp(min=0), 1 + self.strengths)
        jitter = torch.where(jittered[:, None], factors, 1.0).to(torch.float32)
        blurred = torch.rand(count, generator=self.generator) < self.blur_prob
        sigmas = torch.where(blurred, self._uniform((count,), *self.blur_sigma), 0.0).to(torch.float32)
        return ViewParameters(crops, flips, jitter, sigmas)

    def _jitter(self, views: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast (about the mean of all channels) and, for 3 channels, saturation, each clipped
        to [0, 1], as ``TwoViewAugmentd._jitter``; factors 1 leave a view in [0, 1] unchanged."""
        brightness, contrast, saturation = (factors[:, i, None, None, None] for i in range(3))
        views = (views * brightness).clamp_(0, 1)
        means = views.mean(dim=(1, 2, 3), keepdim=True)
        views = views.sub_(means).mul_(contrast).add_(means).clamp_(0, 1)
        if views.shape[1] == 3:
            grey = torch.einsum("c,nchw->nhw", views.new_tensor(GREY_WEIGHTS), views)[:, None]
            views = views.mul_(saturation).add_(grey * (1 - saturation)).clamp_(0, 1)
        return views

    def views(self, images: torch.Tensor, params: ViewParameters) -> torch.Tensor:
        """One view of every image for ``params``.

        Args:
            images: (N, C, H, W) float sources in [0, 1], C in {1, 3}, on the device to augment on.
            params: parameters of N views (view n of image n) on the CPU, where the kernels and the sampling
                coordinates are built before one copy each to the images' device.

        Returns:
            (N, out_channels, H', W') float32 views, normalised.
        """
        count, channels, height, width = images.shape
        if params.crops.shape[0] != count:
            raise ValueError(f"params hold {params.crops.shape[0]} views for {count} images.")
        device = images.device
        sources = images.to(torch.float32)
        out_h, out_w = self.spatial_size
        crops = params.crops.to(torch.float32)
        aa_y = ((crops[:, 2] / out_h - 1) / 2).clamp(min=0)  # anti-aliasing where a view shrinks its crop
        aa_x = ((crops[:, 3] / out_w - 1) / 2).clamp(min=0)
        sources = gaussian_blur(sources, aa_y, aa_x)
        rows, columns = _sampling_coordinates(params.crops, params.flips, (height, width), (out_h, out_w))
        rows, columns = rows.to(device, non_blocking=True), columns.to(device, non_blocking=True)
        grid = torch.stack(torch.broadcast_tensors(columns[:, None, :], rows[:, :, None]), dim=-1)
        views = F.grid_sample(sources, grid, mode="bilinear", padding_mode="border", align_corners=False)
        views = self._jitter(views, params.jitter.to(device, non_blocking=True))
        views = gaussian_blur(views, params.sigmas, params.sigmas)
        out = views.new_empty(count, self.out_channels, out_h, out_w)
        for c, (mean, std) in enumerate(zip(self.mean, self.std)):  # grey repeated to out_channels on the way
            # channel by channel with scalars: a broadcast (N, 1) -> (N, 3) addcmul is ~5x slower on a CPU
            torch.mul(views[:, min(c, channels - 1)], 1 / std, out=out[:, c]).sub_(mean / std)
        return out

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Two views of every image: ``view1``, ``view2`` (N, out_channels, H', W'); ``box1``, ``box2`` (N, 4)
        crops (y0, x0, y1, x1) as fractions of the source's height and width; ``flip1``, ``flip2`` (N,) bool.

        Args:
            images: (N, C, H, W) sources in [0, 1], C in {1, 3}, H, W >= 2, on the device to augment on.
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(f"images must be a (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}.")
        count, channels, height, width = images.shape
        if channels not in (1, 3) or channels > self.out_channels or min(height, width) < 2:
            raise ValueError(f"images must be (N, C, H, W) with C in {{1, 3}} (at most out_channels="
                             f"{self.out_channels}) and H, W >= 2, got {tuple(images.shape)}.")
        out: dict[str, torch.Tensor] = {}
        for i in (1, 2):  # one view at a time: half the memory of both at once (CPU allocations cost page faults)
            params = self.sample(height, width, count)
            top, left, h, w = params.crops.to(torch.float32).unbind(1)
            boxes = torch.stack([top / height, left / width, (top + h) / height, (left + w) / width], dim=1)
            out[f"view{i}"] = self.views(images, params)
            out[f"box{i}"] = boxes.to(images.device, non_blocking=True)
            out[f"flip{i}"] = params.flips.to(images.device, non_blocking=True)
        return out


class PrepareTwoViewBatch:
    """``prepare_batch`` of MONAI's ``SupervisedTrainer`` for LVM-Med: the batch's images are moved to the
    trainer's device and augmented there into two views (:class:`BatchTwoViewAugment`); with ``augment`` None
    the batch already holds the views of the per-sample path (``TwoViewAugmentd`` in the dataset) and is only
    moved. Returns (view1, no label, (view2, box1, flip1, box2, flip2), {}), what ``PretrainModel`` takes.

    Args:
        augment: the batched augmentation, or None for batches augmented per sample.
        key: key of the (N, C, H, W) images in the batch.
    """

    def __init__(self, augment: BatchTwoViewAugment | None = None, key: str = "image") -> None:
        self.augment = augment
        self.key = key

    def __call__(
        self, batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None, tuple[torch.Tensor, ...], dict]:
        if self.augment is None:
            return prepare_two_view_batch(batchdata, device, non_blocking, **kwargs)
        if self.key not in batchdata:
            raise ValueError(f"a batch for the batched augmentation needs the key {self.key!r}; it has "
                             f"{sorted(map(str, batchdata))} (per-sample views need PrepareTwoViewBatch(None)).")
        images = torch.as_tensor(batchdata[self.key]).to(device=device, non_blocking=non_blocking, **kwargs)
        return prepare_two_view_batch(self.augment(images), device, non_blocking)


def source_transform(spatial_size: Sequence[int] | int, key: str = "image") -> Compose:
    """Decoded (C, H, W) images in [0, 1] to the batched path's fixed-size sources (plain float32 tensors).

    Resized bilinearly (anti-aliased when shrinking) to ``spatial_size``, non-square images stretched: crop
    boxes are fractions of the image, so they describe the same places of the original. Channels are kept
    (:func:`collate_sources` repeats grey ones where a batch mixes them with colour). Deterministic, so a
    ``CacheDataset`` caches its output.

    Args:
        spatial_size: source size (H, W), or an int for square sources.
        key: the image's key in the sample dicts.
    """
    size = ensure_tuple_rep(spatial_size, 2)
    if len(size) != 2 or min(size) < 2:
        raise ValueError(f"source_size must be an int or pair >= 2, got {spatial_size}.")
    return Compose([
        Resized(keys=key, spatial_size=size, mode="bilinear", anti_aliasing=True),
        EnsureTyped(keys=key, data_type="tensor", dtype=torch.float32, track_meta=False),
    ])


def dataset_transform(mode: str, per_sample: Any, source_size: Sequence[int] | int) -> Any:
    """The pretraining dataset's transform for an augmentation ``mode``: ``per_sample`` (the given transform,
    e.g. ``TwoViewAugmentd``) for ``"per_sample"``, :func:`source_transform` for ``"batched"``."""
    if mode not in AUGMENTATION_MODES:
        raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATION_MODES)}, got {mode!r}.")
    return per_sample if mode == "per_sample" else source_transform(source_size)


def collate_sources(samples: Sequence[Mapping[str, Any]], key: str = "image") -> Any:
    """MONAI's ``list_data_collate``, after repeating grey ``key`` images to 3 channels where the batch also holds
    colour ones (a batch of grey images stays 1-channel: a third of the augmentation's work). Samples without
    ``key`` (views made per sample) are collated unchanged."""
    channels = {sample[key].shape[0] for sample in samples if key in sample}
    if len(channels) > 1:
        samples = [{**sample, key: three_channels(sample[key])} if key in sample else sample for sample in samples]
    return list_data_collate(samples)
