"""Pretraining samples: every 2D image and every slice of every 3D volume that a manifest names.

:class:`PretrainSliceDataset` builds its index eagerly, at construction: it expands each manifest entry into
images and reads their headers only (no pixel data), which finds missing files, unreadable or truncated
files, DICOM files without pixel data or decoder, 4D and empty images, and images whose dimension does not
match their entry. Pixel data is read lazily, one normalised volume at a time, through a small LRU cache.
Data-level faults (corrupt compressed data, NaN/Inf) cannot be seen in headers: ``verify_data=True`` (or
``min_foreground > 0``, which reads the data anyway) finds them at construction too; otherwise reading such
an image later raises :class:`~scripts.data.readers.ImageReadError` naming it.

Headers of unchanged files are remembered between runs beside the manifest
(:class:`~scripts.data.header_cache.HeaderCache`), so a restart on a large collection stats its files instead
of re-reading every header.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from scripts.data.folder_scan import NOT_FOUND, modality_hint, scan_folder
from scripts.data.header_cache import HeaderCache, header_cache_path
from scripts.data.intensity import normalise_intensity, to_channel_first
from scripts.data.manifest import SourceDataset, load_manifest
from scripts.data.readers import ImageHeader, ImageReadError, ImageSource, read_header, read_image
from scripts.data.sources import expand_entry

__all__ = ["PretrainSliceDataset"]

logger = logging.getLogger("lvmmed.data")


@dataclass(frozen=True)
class _Image:
    """One image of the index: the manifest entry it belongs to, where it is read from, its header."""

    entry: SourceDataset
    source: ImageSource
    header: ImageHeader


def _slice_count(image: _Image) -> int:
    """Samples the image gives (1 for 2D); ImageReadError when its dimension does not fit its entry."""
    entry, shape, path = image.entry, image.header.shape, image.source.path
    if entry.dimension == 2:
        if len(shape) == 3 and shape[2] != 1:
            raise ImageReadError(path, f"3D image of shape {shape} in the 2D dataset {entry.name!r} "
                                       "(set the dataset's dimension to 3 to cut it into slices)")
        plane, count = shape[:2], 1
    else:
        if len(shape) == 2:
            raise ImageReadError(path, f"2D image of shape {shape} in the 3D dataset {entry.name!r} "
                                       "(set the dataset's dimension to 2)")
        if image.header.channels > 1 and entry.slice_axis != 2:
            raise ImageReadError(path, f"colour volume of shape {shape} (a cine loop: rows, columns, frames) in the "
                                       f"dataset {entry.name!r} with slice_axis {entry.slice_axis}: colour volumes are "
                                       "cut into their frames only (slice_axis 2)")
        plane = tuple(s for axis, s in enumerate(shape) if axis != entry.slice_axis)
        count = shape[entry.slice_axis]
    if min(plane) < 2:
        raise ImageReadError(path, f"images of shape {plane} (from shape {shape}) are smaller than 2 x 2 pixels")
    return count


class PretrainSliceDataset(Dataset):
    """2D pretraining samples from a manifest: each 2D image is one sample, each 3D volume one per slice (each
    frame of a colour cine loop is one RGB sample).

    A sample is the dict ``{"image": float32 tensor (C, H, W) in [0, 1] (C = 1 grey, 3 colour), "modality": str,
    "label": str, "source": str (the file, or the folder of a DICOM series), "slice": int (index along the
    entry's ``slice_axis``; 0 for 2D images)}``, passed through ``transform`` when one is given. Intensities
    are normalised per image or per whole volume (:mod:`scripts.data.intensity`).

    Args:
        manifest: a manifest file (JSON or CSV), its entries, or a folder of images, scanned into entries as
            ``python -m scripts.make_manifest`` does (:func:`scripts.data.folder_scan.scan_folder`; nothing is
            written into it).
        transform: a callable applied to each sample dict (e.g. a MONAI ``Compose`` ending in
            ``TwoViewAugmentd``).
        min_foreground: keep only slices (and 2D images) whose share of foreground pixels is at least this;
            0 keeps every slice and reads no pixel data at construction.
        foreground_level: a pixel is foreground when its normalised intensity exceeds this.
        cache_size: how many normalised images/volumes are kept in memory (least recently used dropped first);
            0 disables the cache.
        on_error: ``"skip"``: an image that cannot be indexed is logged with its file and reason and listed in
            ``skipped``; ``"raise"``: the first one raises its :class:`~scripts.data.readers.ImageReadError`.
        verify_data: read every image's data at construction (slower; also finds corrupt compressed data and
            NaN/Inf values).
        header_cache: where headers are remembered between runs: True for ``<manifest>.headers.json`` beside a
            manifest file (none for a folder or a list of entries), a path for that file, False for none.

    Attributes:
        skipped: ``(path, reason)`` of every image or entry left out.
        modality_sources: entry name -> how its modality was found (``"manifest"`` for a manifest's entries, the
            rule of :mod:`scripts.data.folder_scan` for a scanned folder's).
        headers_reused, headers_read: headers taken from the header cache / read from the files.
    """

    def __init__(
        self,
        manifest: str | Path | Sequence[SourceDataset],
        transform: Callable[[dict[str, Any]], Any] | None = None,
        *,
        min_foreground: float = 0.0,
        foreground_level: float = 0.05,
        cache_size: int = 4,
        on_error: str = "skip",
        verify_data: bool = False,
        header_cache: bool | str | Path = True,
    ) -> None:
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if not 0.0 <= min_foreground <= 1.0:
            raise ValueError(f"min_foreground must lie in [0, 1], got {min_foreground}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        folder = isinstance(manifest, (str, Path)) and Path(manifest).is_dir()
        if folder:
            scanned, _ = scan_folder(manifest)  # unreadable files are reported when their headers are read below
            self.entries = [item.entry for item in scanned]
            self.modality_sources = {item.entry.name: item.modality_source for item in scanned}
            for item in scanned:
                logger.info("%s: dataset %r, %s, modality %s (from %s)", manifest, item.entry.name,
                            f"{item.entry.dimension}D", item.entry.modality, item.modality_source)
            unknown = [name for name, source in self.modality_sources.items() if source == NOT_FOUND]
            if unknown:
                logger.warning("%s: %s", manifest, modality_hint(unknown))
        else:
            self.entries = load_manifest(manifest) if isinstance(manifest, (str, Path)) else list(manifest)
            self.modality_sources = {entry.name: "manifest" for entry in self.entries}
        self.transform = transform
        self.min_foreground = float(min_foreground)
        self.foreground_level = float(foreground_level)
        self.cache_size = int(cache_size)
        self.on_error = on_error
        self.skipped: list[tuple[str, str]] = []
        self._images: list[_Image] = []
        self._index: list[tuple[int, int]] = []
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        read_data = verify_data or self.min_foreground > 0
        if header_cache is True:
            cache_file = header_cache_path(manifest) if isinstance(manifest, (str, Path)) and not folder else None
        else:
            cache_file = header_cache or None
        self._headers = HeaderCache(cache_file) if cache_file is not None else None
        self.headers_reused = self.headers_read = 0
        for entry in self.entries:
            try:
                sources = expand_entry(entry)
            except ImageReadError as error:
                self._reject(error)
                continue
            for source in sources:
                try:
                    self._add(entry, source, read_data)
                except ImageReadError as error:
                    self._reject(error)
        if self._headers is not None:
            self._headers.save()
            logger.info("header cache %s: %d headers reused, %d read", self._headers.path, self.headers_reused,
                        self.headers_read)
            self._headers = None  # the index holds the headers now
        logger.info("indexed %d samples from %d images of %d datasets; %d skipped", len(self._index),
                    len(self._images), len(self.entries), len(self.skipped))

    def _reject(self, error: ImageReadError) -> None:
        if self.on_error == "raise":
            raise error
        logger.warning("skipping %s: %s", error.path, error.reason)
        self.skipped.append((str(error.path), error.reason))

    def _add(self, entry: SourceDataset, source: ImageSource, read_data: bool) -> None:
        header = self._headers.lookup(source) if self._headers is not None else None
        self.headers_reused += header is not None
        if header is None:
            header = read_header(source)
            self.headers_read += 1
            if self._headers is not None:
                self._headers.store(source, header)
        image = _Image(entry, source, header)
        count = _slice_count(image)
        number = len(self._images)
        self._images.append(image)
        kept = range(count)
        if read_data:
            try:
                values = self._values(number)
            except ImageReadError:
                self._images.pop()
                raise
            if self.min_foreground > 0:
                kept = np.flatnonzero(self._foreground(values, entry) >= self.min_foreground).tolist()
                if len(kept) < count:
                    logger.info("%s: %d of %d slices have less than %.1f%% foreground", source.path,
                                count - len(kept), count, 100 * self.min_foreground)
        self._index.extend((number, int(s)) for s in kept)

    def _foreground(self, values: np.ndarray, entry: SourceDataset) -> np.ndarray:
        """Share of foreground pixels of each slice (one value for a 2D image)."""
        mask = values > self.foreground_level
        if entry.dimension == 2:
            return np.array([mask.mean()])
        return mask.mean(axis=tuple(axis for axis in range(mask.ndim) if axis != entry.slice_axis))

    def _values(self, number: int) -> np.ndarray:
        """Normalised values of image ``number``: (C, H, W) for 2D, the whole volume for 3D ((H, W, D) grey,
        (H, W, T, 3) colour); LRU-cached."""
        if number in self._cache:
            self._cache.move_to_end(number)
            return self._cache[number]
        image = self._images[number]
        array, header = read_image(image.source)
        values = normalise_intensity(array, image.entry.modality, image.entry.window, header.dtype)
        if image.entry.dimension == 2:
            values = to_channel_first(values)
        if self.cache_size:
            self._cache[number] = values
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return values

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> Any:
        number, slice_index = self._index[index]
        image = self._images[number]
        values = self._values(number)
        if image.entry.dimension == 2:
            pixels = values.copy()
        else:
            pixels = to_channel_first(np.take(values, slice_index, axis=image.entry.slice_axis))
        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(pixels)),
            "modality": image.entry.modality,
            "label": image.entry.label,
            "source": str(image.source.path),
            "slice": slice_index,
        }
        return self.transform(sample) if self.transform is not None else sample

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (e.g. for DataLoader workers) without the cached volumes."""
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    @property
    def modalities(self) -> list[str]:
        """Modality of every sample, in index order (no data is read)."""
        return [self._images[number].entry.modality for number, _ in self._index]

    @property
    def dataset_names(self) -> list[str]:
        """Manifest entry name of every sample, in index order (no data is read)."""
        return [self._images[number].entry.name for number, _ in self._index]
