"""MONAI Label app serving this bundle (and any other local zoo bundle) through MONAI Label's bundle tasks.

``BundleInferTask`` reads ``configs/inference.json`` (``bundle_root``, ``device``, ``network_def``,
``preprocessing``, ``inferer``, ``postprocessing``) with the weights ``models/model.pt``; ``BundleTrainTask`` reads
``configs/train.json`` (``train#dataset#data``, ``validate#dataset#data``, ``train#trainer#max_epochs``, ...). The
label names come from ``channel_def`` of the first output in ``configs/metadata.json``.

The bundles live in ``<app>/model/<name>``; this app never reaches the model zoo. Three adaptations to MONAI
Label 0.8.5's bundle tasks:

* the model is announced as 3D (``dimension`` 3): the bundle's 2D network segments volumes slice by slice, and
  viewers offer only 3D models for volumes (``BundleInferTask`` takes the dimension from the input's
  ``spatial_shape`` in ``metadata.json``, which is the 2D network's);
* the mask of a 2D image is brought to the image's (H, W) before MONAI Label's ``Restored`` (the bundle's
  post-processing keeps the singleton slice axis its ``AsVolumed`` added, which ``Restored`` cannot compare with the
  image's recorded 2D shape);
* training writes its logs and checkpoints to ``<app>/train_runs/<name>``, outside the served bundle folder
  (the bundle's own ``runs/`` would grow inside it). Each request starts from ``models/model.pt`` (MONAI Label's
  ``CheckpointLoader``; the bundle's ``ResumeFromLatest`` stands aside) and writes ``models/model.pt`` back: the
  best on validation, or the last network when the request has no validation images;
* the label names served are the model's own, stored beside its weights (``models/model.settings.json``, see
  ``scripts/model_settings.py``) when they are there, with a warning when they contradict ``channel_def``; training
  stores ``channel_def``'s names as the model's ``class_names``.

Usage (in the MONAI Label environment, see ``bundle/monailabel/environment.py``)::

    python -m monai.bundle download --name lvm_med --url file:///path/lvm_med_v<version>.zip --bundle_dir <app>/model
    python -m monailabel.main start_server --app <app> --studies <images> --conf models lvm_med --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import monailabel
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.transform.post import Restored
from monailabel.utils.others.generic import strtobool

logger = logging.getLogger(__name__)


class PlanarMaskd(MapTransform):
    """Reshapes the mask of a 2D image, (1, H, W, 1) or (1, H, W) after the bundle's post-processing, to the image's
    (H, W) as recorded by MONAI Label's loader (``spatial_shape``), as 8-bit class indices (MONAI Label writes the
    mask of a PNG as a PNG, which ITK writes from 8- or 16-bit integers only); masks of volumes pass unchanged.

    Args:
        keys: the masks.
        ref_image: the image whose metadata holds ``spatial_shape``.
    """

    def __init__(self, keys: str | Sequence[str], ref_image: str) -> None:
        super().__init__(keys)
        self.ref_image = ref_image

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d.get(self.ref_image)
        meta = image.meta if isinstance(image, MetaTensor) else d.get(f"{self.ref_image}_meta_dict", {})
        shape = tuple(int(size) for size in meta.get("spatial_shape", ()))
        if len(shape) != 2:
            return d
        for key in self.key_iterator(d):
            mask = d[key]
            if mask.numel() != math.prod(shape):
                raise ValueError(f"the mask of {key!r} has shape {tuple(mask.shape)}, which does not hold the image's "
                                 f"{shape}.")
            if mask.min() < 0 or mask.max() > 255:
                raise ValueError(f"the mask of {key!r} holds values outside [0, 255]: not class indices.")
            d[key] = torch.reshape(mask, shape).to(torch.uint8)
        return d


class VolumeSliceInferTask(BundleInferTask):
    """``BundleInferTask`` announcing a 3D model, whose 2D masks are brought to (H, W) before ``Restored``."""

    def __init__(self, path: str, conf: dict[str, str], **kwargs: Any) -> None:
        super().__init__(path, conf, **kwargs)
        self.dimension = 3
        if self.is_valid():
            self.labels = self._stored_labels(path)

    def _stored_labels(self, path: str) -> dict[str, int]:
        """The served ``{name: index}`` labels: the class names stored with the model when it has them, else
        ``metadata.json``'s ``channel_def`` (what ``BundleInferTask`` read); a contradiction is warned about."""
        sys.path.insert(0, path)  # the config's expressions import the bundle's scripts, as in BundleInferTask
        try:
            names = self.bundle_config.get_parsed_content("model_settings").get("class_names")
        finally:
            sys.path.remove(path)
        if not names:
            return self.labels
        stored = {str(name).lower(): index for index, name in enumerate(names) if index}
        if stored != self.labels:
            logger.warning("%s: serving the class names stored with models/model.pt %s, not metadata.json's "
                           "channel_def %s", path, stored, self.labels)
        return stored

    def post_transforms(self, data: Any = None) -> Sequence[Callable]:
        post = list(super().post_transforms(data))
        restore = next((index for index, t in enumerate(post) if isinstance(t, Restored)), len(post))
        post.insert(restore, PlanarMaskd(keys=self.key_pred, ref_image=self.key_image))
        return post


def channel_names(bundle: str) -> list[str]:
    """The class names of ``channel_def`` (first output of ``configs/metadata.json``) by index: what the served
    labels are, stored as the trained model's ``class_names`` (without it, ``configs/train.json`` would read them
    from its built-in datalist, preparing that data inside the served bundle)."""
    with open(os.path.join(bundle, "configs", "metadata.json"), encoding="utf-8") as file:
        outputs = json.load(file)["network_data_format"]["outputs"]
    channels = next(iter(outputs.values())).get("channel_def", {})
    return [str(channels[key]) for key in sorted(channels, key=int)]


class OutsideBundleTrainTask(BundleTrainTask):
    """``BundleTrainTask`` whose run folder (``output_dir``: logs, checkpoints) is ``runs_dir``, outside the bundle."""

    def __init__(self, path: str, conf: dict[str, str], runs_dir: str) -> None:
        super().__init__(path, conf)
        self.runs_dir = runs_dir

    def _update_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        overrides["output_dir"] = self.runs_dir
        overrides["class_names"] = channel_names(self.bundle_path)
        return overrides


class LVMMedBundleApp(MONAILabelApp):
    """Serves the bundles named by ``--conf models a,b`` (default ``lvm_med``) from ``<app>/model/``.

    Other options: ``--conf skip_trainers true`` serves inference only.
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        model_dir = os.path.join(app_dir, "model")
        names = [name.strip() for name in conf.get("models", "lvm_med").split(",") if name.strip()]
        missing = [name for name in names if not os.path.isfile(os.path.join(model_dir, name, "configs", "metadata.json"))]
        if missing:
            raise FileNotFoundError(
                f"bundle(s) {missing} are not installed in {model_dir}; install one with: python -m monai.bundle "
                f"download --name <name> --url file:///path/<name>_v<version>.zip --bundle_dir {model_dir}"
            )
        self.bundles = {name: os.path.join(model_dir, name) for name in names}
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"LVM-Med bundle ({monailabel.__version__})",
            description="LVM-Med segmentation bundle served through MONAI Label's bundle tasks",
            version=monailabel.__version__,
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name, path in self.bundles.items():
            task = VolumeSliceInferTask(path, self.conf, type="segmentation")
            if not task.is_valid():
                raise RuntimeError(f"{path} cannot be served: it needs configs/inference.json and models/model.pt")
            logger.info("inference task %s => %s", name, path)
            infers[name] = task
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        trainers: dict[str, TrainTask] = {}
        for name, path in self.bundles.items():
            task = OutsideBundleTrainTask(path, self.conf, os.path.join(self.app_dir, "train_runs", name))
            if task and task.is_valid():
                logger.info("training task %s => %s", name, path)
                trainers[name] = task
        return trainers

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}
