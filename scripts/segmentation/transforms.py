"""Transforms of the segmentation workflows that MONAI has no equivalent for.

Every image, 2D or 3D, goes through the workflows as a volume of slices (a 2D image is a volume of one slice):
training draws single slices with balanced foreground (``SliceBalanceIndicesd`` feeding MONAI's
``RandCropByPosNegLabeld``), validation, evaluation and inference run the 2D network slice by slice (MONAI's
``SliceInferer``) and invert the resizing (MONAI's ``Invertd``), so that one config serves PNG, DICOM and NIfTI.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import FolderLayout, MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import MapTransform, SaveImage, SaveImaged

from scripts.data.readers import detect_format

__all__ = [
    "AsVolumed",
    "MatchChannelsd",
    "SaveMaskd",
    "SliceBalanceIndicesd",
    "ValidateLabeld",
    "NORMALISATIONS",
    "imagenet_statistics",
    "normalisation_statistics",
]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg")

logger = logging.getLogger(__name__)


def imagenet_statistics(channels: int) -> tuple[list[float], list[float]]:
    """(mean, std) per channel for ``NormalizeIntensityd``: ImageNet's for 3 channels, as in pretraining, and their
    averages (0.449, 0.226) for every channel otherwise; for 1 channel they approximate what the channel-summed
    first convolution of a 3-channel checkpoint saw in pretraining (grey images repeated to 3 channels, then
    normalised)."""
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}.")
    if channels == 3:
        return list(_IMAGENET_MEAN), list(_IMAGENET_STD)
    return [float(np.mean(_IMAGENET_MEAN))] * channels, [float(np.mean(_IMAGENET_STD))] * channels



# The two input scalings of the LVM-Med code base (docs/interoperability.md#input-normalisation gives the evidence):
# "imagenet": intensities in [0, 1], then ImageNet's mean/std (the official classification scripts, torchvision);
# "minmax_255": min-max scaled to [0, 255] and nothing else (the official R50 segmentation data loader).
NORMALISATIONS = ("imagenet", "minmax_255")


def normalisation_statistics(normalisation: str, channels: int) -> tuple[list[float], list[float]]:
    """(subtrahend, divisor) per channel for ``NormalizeIntensityd`` applied to intensities already in [0, 1]:
    :func:`imagenet_statistics` for ``"imagenet"``; (0, 1/255), i.e. a scaling to [0, 255], for ``"minmax_255"``
    (the configs then scale to [0, 1] by the image's minimum and maximum, not by percentiles).

    Raises:
        ValueError: an unknown ``normalisation`` or a non-positive ``channels``.
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}.")
    if normalisation == "imagenet":
        return imagenet_statistics(channels)
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}.")
    return [0.0] * channels, [1.0 / 255.0] * channels

def _source(image: torch.Tensor) -> str:
    """The file an image was loaded from, for error messages."""
    name = image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None
    return str(name) if name else "<image without file name>"


class AsVolumed(MapTransform):
    """Gives 2D images (C, H, W) a singleton slice axis, so that they are volumes of one slice; volumes pass.

    The affine becomes 4x4 (the slice axis has unit spacing); MONAI's ``SaveImage`` drops the singleton again
    when writing (``squeeze_end_dims``).

    Args:
        keys: images to convert (channel-first).
        slice_axis: spatial axis (0, 1 or 2) along which volumes are sliced; the new axis goes there.
    """

    def __init__(self, keys: KeysCollection, slice_axis: int = 2, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis}.")
        self.slice_axis = slice_axis

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.ndim == 4:
                continue
            if image.ndim != 3:
                raise ValueError(f"{_source(image)}: expected a channel-first 2D image or 3D volume, got shape "
                                 f"{tuple(image.shape)}.")
            volume = image.unsqueeze(self.slice_axis + 1)
            if isinstance(volume, MetaTensor):
                # the 2D affine with a unit third axis, whose column moves to where the singleton axis was inserted
                affine = to_affine_nd(3, image.affine)
                order = [0, 1]
                order.insert(self.slice_axis, 2)
                volume.affine = affine[:, [*order, 3]]
            d[key] = volume
        return d


class MatchChannelsd(MapTransform):
    """Brings channel-first images to the network's channel count: equal counts pass, grey images are repeated,
    RGBA loses its alpha channel; any other count is an error naming the file.

    Args:
        keys: images to adapt.
        channels: the network's ``in_channels``.
    """

    def __init__(self, keys: KeysCollection, channels: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}.")
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            count = image.shape[0]
            if count == self.channels:
                continue
            if count == 1:
                d[key] = image.repeat(self.channels, *([1] * (image.ndim - 1)))
            elif count == 4 and self.channels == 3:
                d[key] = image[:3]
            else:
                raise ValueError(f"{_source(image)}: image has {count} channels but the network takes "
                                 f"in_channels={self.channels}.")
        return d


class ValidateLabeld(MapTransform):
    """Checks that a label fits its image: one channel, the image's spatial shape, integer class indices in
    [0, num_classes). Raises ``ValueError`` naming the label file otherwise.

    Args:
        keys: labels to check (channel-first).
        image_key: the image each label belongs to.
        num_classes: classes of the network, background included.
    """

    def __init__(self, keys: KeysCollection, image_key: str, num_classes: int, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image = d[self.image_key]
        for key in self.key_iterator(d):
            label = d[key]
            if label.shape[0] != 1:
                raise ValueError(f"{_source(label)}: label has {label.shape[0]} channels, expected 1 (class indices).")
            if tuple(label.shape[1:]) != tuple(image.shape[1:]):
                raise ValueError(f"{_source(label)}: label shape {tuple(label.shape[1:])} differs from the shape "
                                 f"{tuple(image.shape[1:])} of its image {_source(image)}.")
            values = torch.as_tensor(label)
            if values.min() < 0 or values.max() >= self.num_classes or not torch.equal(values, values.round()):
                found = torch.unique(values)[:10].tolist()
                raise ValueError(f"{_source(label)}: label values must be integers in [0, {self.num_classes}), "
                                 f"found {found}.")
        return d


class SliceBalanceIndicesd(MapTransform):
    """Marks which slices of a label volume hold foreground, for MONAI's ``RandCropByPosNegLabeld`` with a crop of
    one whole slice (``spatial_size`` -1 in-plane, 1 along the slice axis).

    LVM-Med trains 3D tasks on 2D slices and samples "equally 2D slices covering target regions and other 2D
    slices, not including the ground truth" (Nguyen et al., NeurIPS 2023, appendix B). MONAI's sampler draws
    crop centres from voxel indices, so slices with a large foreground would be drawn more often and a
    "negative" centre could lie in a slice with foreground; here each slice contributes exactly one index, to
    the foreground list when it holds any foreground voxel and to the background list otherwise. With
    ``pos=neg=1`` every drawn slice is then a foreground slice or an empty one with probability 1/2 each,
    uniformly within each group (a volume whose slices are all of one kind gives that kind only).

    Args:
        keys: the label (channel-first, (1, *spatial)).
        slice_axis: spatial axis of the slices (0, 1 or 2).
        fg_indices_key, bg_indices_key: where to store the flat voxel indices (one per slice).

    Example::

        balance = SliceBalanceIndicesd("label", slice_axis=2)
        draw = RandCropByPosNegLabeld(["image", "label"], "label", spatial_size=[-1, -1, 1], num_samples=8,
                                      fg_indices_key="fg_slices", bg_indices_key="bg_slices")
        slices = draw(balance({"image": volume, "label": label}))  # 8 slices of shape (C, H, W, 1)
    """

    def __init__(
        self,
        keys: KeysCollection,
        slice_axis: int = 2,
        fg_indices_key: str = "fg_slices",
        bg_indices_key: str = "bg_slices",
    ) -> None:
        super().__init__(keys)
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis}.")
        self.slice_axis = slice_axis
        self.fg_indices_key = fg_indices_key
        self.bg_indices_key = bg_indices_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = torch.as_tensor(d[key])
            if label.ndim != 4:
                raise ValueError(f"{_source(d[key])}: expected a channel-first label volume, got {tuple(label.shape)}.")
            spatial = tuple(label.shape[1:])
            others = tuple(axis + 1 for axis in range(3) if axis != self.slice_axis)
            has_foreground = (label > 0).any(dim=(0, *others)).cpu().numpy()
            centre = [size // 2 for size in spatial]

            def flat_indices(slices: np.ndarray) -> np.ndarray:
                coordinates = [np.full(len(slices), c) for c in centre]
                coordinates[self.slice_axis] = slices
                return np.ravel_multi_index(coordinates, spatial)

            foreground = flat_indices(np.flatnonzero(has_foreground))
            background = flat_indices(np.flatnonzero(~has_foreground))
            # a volume (or 2D image) with slices of one kind only: both lists hold them, which draws the same
            # slices as MONAI's fallback for an empty list, without its warning for every such image
            d[self.fg_indices_key] = foreground if len(foreground) else background
            d[self.bg_indices_key] = background if len(background) else foreground
        return d


class SaveMaskd(SaveImaged):
    """Writes each mask beside the format of its input: PNG for PNG/JPEG inputs, compressed NIfTI for NIfTI inputs,
    DICOM-SEG for DICOM (file or series) inputs (``scripts.segmentation.dicom_seg``: one segment per foreground
    class, referencing the source series and, frame by frame, its instances; NIfTI with ``dicom_seg=False``), with
    the input's geometry (the mask must already be in the input's space, e.g. after MONAI's ``Invertd``). Paths
    follow MONAI's ``SaveImage``:
    ``{output_dir}/[{relative folder under data_root_dir}/][{name}/]{name}_{output_postfix}{.png|.nii.gz|.dcm}``.

    It is a ``SaveImaged`` (its NIfTI writer is ``SaveImaged``'s own ``saver``), so that applications which drop
    the saving steps of a bundle's post-processing by that type drop it too: MONAI Label's ``BundleInferTask``
    (``post_filter=[SaveImaged]``) returns the mask to the client and writes nothing into the bundle.

    Args:
        keys: the masks (channel-first class indices, e.g. after ``AsDiscreted(argmax=True)``).
        output_dir: root folder of the outputs.
        output_postfix: appended to the input's file name.
        separate_folder: one sub-folder per input (MONAI's default) or all masks in ``output_dir``.
        data_root_dir: inputs' common root; their sub-folders under it are kept in ``output_dir``.
        print_log: log each saved path.
        dicom_seg: write DICOM inputs' masks as DICOM-SEG (default) or as NIfTI.
        class_names: segment labels of classes 1, 2, ... in DICOM-SEG objects (default ``class 1``, ...).

    Example::

        save = SaveMaskd("pred", output_dir="runs/inference", output_postfix="seg")
        save({"pred": mask})  # mask loaded from scan.nii.gz -> runs/inference/scan_seg.nii.gz
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | Path,
        output_postfix: str = "seg",
        separate_folder: bool = False,
        data_root_dir: str | Path = "",
        print_log: bool = True,
        dicom_seg: bool = True,
        class_names: Sequence[str] | None = None,
    ) -> None:
        options = {
            "output_dir": output_dir,
            "output_postfix": output_postfix,
            "output_dtype": np.uint8,
            "resample": False,
            "separate_folder": separate_folder,
            "data_root_dir": data_root_dir,
            "print_log": print_log,
        }
        super().__init__(keys, output_ext=".nii.gz", **options)
        self.png = SaveImage(output_ext=".png", **options)
        self.dicom_seg = dicom_seg
        self.class_names = None if class_names is None else list(class_names)
        self.print_log = print_log
        self.dicom_layout = FolderLayout(output_dir, postfix=output_postfix, extension=".dcm", parent=separate_folder,
                                         makedirs=True, data_root_dir=data_root_dir)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            # SaveImage drops the singleton slice axis of 2D inputs (squeeze_end_dims)
            source = _source(d[key])
            if self.dicom_seg and _is_dicom(source):
                # imported here: highdicom needs pydicom 3, which MONAI Label 0.8.5's environment cannot have (it
                # imports this module to serve the bundle, and drops this saver)
                from scripts.segmentation.dicom_seg import write_dicom_seg

                path = self.dicom_layout.filename(subject=source)
                write_dicom_seg(d[key][0].cpu().numpy(), d[key].affine.cpu().numpy(), source, path, self.class_names)
                if self.print_log:
                    logger.info("DICOM-SEG of %s saved to %s", source, path)
                continue
            saver = self.png if source.lower().endswith(_PHOTO_SUFFIXES) else self.saver
            d[key] = saver(d[key])
        return d


def _is_dicom(source: str) -> bool:
    """A DICOM file, or a folder holding DICOM files (a series)."""
    path = Path(source)
    if path.is_dir():
        return any(detect_format(entry) == "dicom" for entry in path.iterdir() if entry.is_file())
    return detect_format(path) == "dicom"
