"""Modality balancing (LVM-Med, Nguyen et al., NeurIPS 2023, sec. 4.1): minority modalities are over-sampled.

Every modality is brought up to the sample count of the largest one by duplicating its samples (whole rounds
of a random permutation, so duplicates spread evenly). Each duplicate is a random crop covering a share of
the image area drawn uniformly in ``crop_fraction``, resized back to the original size, so that repeated
images are not identical. Originals are returned untouched.

These crops are a fixed, data-level enlargement of the small modalities, drawn once per (seed, index): they
are *not* the two SSL views, which ``TwoViewAugmentd`` (in the dataset) or ``BatchTwoViewAugment`` (in the
trainer's ``prepare_batch``) draws afresh from every sample (original or duplicate) at every epoch. Being
deterministic, the crops, and whatever deterministic transform follows them, are cached with the decoded
samples by :func:`pretraining_dataset` when ``cache_rate`` > 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Resize, SpatialCrop
from monai.utils import convert_to_tensor
from monai.data import CacheDataset
from monai.data import Dataset as TransformDataset
from torch.utils.data import Dataset

__all__ = ["CachedPretrainingDataset", "ModalityBalancedDataset", "balanced_indices", "pretraining_dataset"]


def balanced_indices(modalities: Sequence[str], seed: int = 0) -> list[int]:
    """Indices into samples whose modalities are ``modalities``: ``0 .. n-1`` once each, followed by duplicates of
    minority modalities' samples until every modality has as many entries as the largest one.

    Duplicates of a modality are whole rounds of a random permutation of its samples (seeded by ``seed``),
    so every sample is repeated the same number of times, give or take one.
    """
    members: dict[str, list[int]] = {}
    for index, modality in enumerate(modalities):
        members.setdefault(modality, []).append(index)
    target = max((len(group) for group in members.values()), default=0)
    rng = np.random.default_rng(seed)
    indices = list(range(len(modalities)))
    for group in members.values():
        missing = target - len(group)
        while missing > 0:
            chosen = rng.permutation(len(group))[:missing]
            indices.extend(group[i] for i in chosen)
            missing -= len(chosen)
    return indices


class ModalityBalancedDataset(Dataset):
    """A dataset whose modalities are balanced by over-sampling (see the module docstring).

    Items ``0 .. len(base) - 1`` are ``base``'s samples unchanged; later items are duplicates of minority
    modalities' samples whose ``key`` image (C, H, W) is replaced by a random crop resized back to (H, W)
    (MONAI ``SpatialCrop`` and bilinear ``Resize``), deterministic per (``seed``, item index).

    Args:
        base: dataset of sample dicts; give it no SSL transform (pass that as ``transform`` here instead).
        crop_fraction: range of the share of the image area a duplicate's crop covers, within (0, 1].
        seed: seed of the duplicate choice and of the crops.
        transform: callable applied to every sample dict after cropping (e.g. ``TwoViewAugmentd``).
        modalities: modality of each of ``base``'s samples; default ``base.modalities``
            (:class:`~scripts.data.slices.PretrainSliceDataset` has it, without reading any data).
        key: key of the image in the sample dicts.
    """

    def __init__(
        self,
        base: Dataset,
        crop_fraction: tuple[float, float] = (0.5, 0.9),
        seed: int = 0,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        modalities: Sequence[str] | None = None,
        key: str = "image",
    ) -> None:
        if len(crop_fraction) != 2 or not 0 < crop_fraction[0] <= crop_fraction[1] <= 1:
            raise ValueError(f"crop_fraction must satisfy 0 < low <= high <= 1, got {crop_fraction}")
        if modalities is None:
            if not hasattr(base, "modalities"):
                raise ValueError(f"{type(base).__name__} has no 'modalities'; pass the modality of each sample")
            modalities = base.modalities
        modalities = list(modalities)
        if len(modalities) != len(base):  # type: ignore[arg-type]
            raise ValueError(f"got {len(modalities)} modalities for {len(base)} samples")  # type: ignore[arg-type]
        self.base = base
        self.crop_fraction = (float(crop_fraction[0]), float(crop_fraction[1]))
        self.seed = int(seed)
        self.transform = transform
        self.key = key
        self.indices = balanced_indices(modalities, self.seed)
        self.modalities = [modalities[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def crop_box(self, index: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop of duplicate ``index`` in an image of ``height`` x ``width``:
        the image's aspect ratio, area share uniform in ``crop_fraction``, position uniform."""
        rng = np.random.default_rng([self.seed, index])
        scale = math.sqrt(rng.uniform(*self.crop_fraction))
        h = min(height, max(1, round(height * scale)))
        w = min(width, max(1, round(width * scale)))
        return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w

    def __getitem__(self, index: int) -> Any:
        index = range(len(self))[index]
        sample = dict(self.base[self.indices[index]])
        if index >= len(self.base):  # type: ignore[arg-type]
            image = sample[self.key]
            height, width = image.shape[-2:]
            top, left, h, w = self.crop_box(index, height, width)
            crop = SpatialCrop(roi_start=(top, left), roi_end=(top + h, left + w))(image)
            resized = Resize((height, width), mode="bilinear", align_corners=False)(crop)
            sample[self.key] = convert_to_tensor(resized, dtype=torch.float32, track_meta=False)
        return self.transform(sample) if self.transform is not None else sample


class CachedPretrainingDataset(CacheDataset):
    """MONAI ``CacheDataset`` over pretraining samples that keeps their ``modalities`` (of ``data``, which has
    them: :class:`ModalityBalancedDataset` or :class:`~scripts.data.slices.PretrainSliceDataset`)."""

    @property
    def modalities(self) -> list[str]:
        return list(self.data.modalities)


def pretraining_dataset(
    data: Dataset,
    transform: Callable[[dict[str, Any]], Any],
    balance: bool,
    crop_fraction: tuple[float, float] = (0.5, 0.9),
    seed: int = 0,
    cache_rate: float = 0.0,
    cache_workers: int = 1,
) -> Dataset:
    """``data`` with ``transform`` applied, modality-balanced when ``balance`` (the pretraining config's switch).

    With ``cache_rate`` > 0 that share of the samples is decoded at construction and kept in memory, after the
    balancing crops and the deterministic transforms that start ``transform`` (MONAI ``CacheDataset``: the
    batched path's fixed-size sources, or the decoded images before ``TwoViewAugmentd``); the rest is read as
    needed.

    Args:
        data: the samples (e.g. :class:`~scripts.data.slices.PretrainSliceDataset`); named as MONAI's bundle
            property ``train#dataset#data``.
        transform: applied to every sample dict (after the balancing crop of a duplicate).
        balance: over-sample minority modalities (:class:`ModalityBalancedDataset`).
        crop_fraction, seed: of the balancing crops.
        cache_rate: share of the samples to cache, in [0, 1].
        cache_workers: threads that fill the cache.

    Raises:
        TypeError: ``balance`` is not a bool (on the command line ``false`` is the string "false", which would
            otherwise count as true: write ``False``).
        ValueError: ``cache_rate`` outside [0, 1].
    """
    if not isinstance(balance, bool):
        raise TypeError(f"balance_modalities must be True or False, got {balance!r} ({type(balance).__name__}).")
    if isinstance(cache_rate, bool) or not isinstance(cache_rate, (int, float)) or not 0 <= cache_rate <= 1:
        raise ValueError(f"cache_rate must be a number in [0, 1], got {cache_rate!r}.")
    if cache_rate > 0:
        base = ModalityBalancedDataset(data, crop_fraction, seed) if balance else data
        return CachedPretrainingDataset(base, transform, cache_rate=float(cache_rate),
                                        num_workers=max(1, int(cache_workers)), progress=False, copy_cache=False)
    if balance:
        return ModalityBalancedDataset(data, crop_fraction, seed, transform)
    return TransformDataset(data, transform)
