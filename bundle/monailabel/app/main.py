"""MONAI Label app serving this bundle (and any other local zoo bundle) through MONAI Label's bundle tasks.

``BundleInferTask`` reads ``configs/inference.json`` (``bundle_root``, ``device``, ``network_def``,
``preprocessing``, ``inferer``, ``postprocessing``) with the weights ``models/model.pt``; ``BundleTrainTask`` reads
``configs/train.json`` (``train#dataset#data``, ``validate#dataset#data``, ``train#trainer#max_epochs``, ...). The
label names come from ``channel_def`` of the first output in ``configs/metadata.json``.

The bundles live in ``<app>/model/<name>``; this app never reaches the model zoo. Usage (in the MONAI Label
environment, see ``bundle/monailabel/environment.py``)::

    python -m monai.bundle download --name lvm_med --url file:///path/lvm_med_v0.1.0.zip --bundle_dir <app>/model
    monailabel start_server --app <app> --studies <images> --conf models lvm_med --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import logging
import os

import monailabel
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import strtobool

logger = logging.getLogger(__name__)


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
            task = BundleInferTask(path, self.conf, type="segmentation")
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
            task = BundleTrainTask(path, self.conf)
            if task and task.is_valid():
                logger.info("training task %s => %s", name, path)
                trainers[name] = task
        return trainers

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}
