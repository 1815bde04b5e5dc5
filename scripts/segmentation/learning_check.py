"""Does segmentation training learn? Validation Dice of the untrained network, then after each validation.

Runs the training config (by default ``configs/train.json`` on the embedded data) with a validation before the
first epoch, into a temporary folder (``models/model.pt`` is not touched), and prints the validation mean Dice
(background excluded) of the untrained network and of the trained one::

    python -m scripts.segmentation.learning_check --max_epochs 10 --image_size 64
    python -m scripts.segmentation.learning_check --architecture transunet --max_epochs 10 --image_size 64
    python -m scripts.segmentation.learning_check --volumetric True --max_epochs 6 --image_size 64

Any other ``--id value`` is passed to the config as an override.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import fire
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

__all__ = ["learning_check"]

_REPO_ROOT = Path(__file__).resolve().parents[2]


def learning_check(config_file: str = str(_REPO_ROOT / "configs" / "train.json"), **override: Any) -> dict[str, float]:
    """Trains with ``override`` and returns ``{"untrained": dice, "trained": last dice, "best": best dice}``."""
    history: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        settings = {"output_dir": folder, "best_model_path": str(Path(folder) / "model.pt"),
                    "validate_at_start": True, **override}
        workflow = ConfigWorkflow(config_file=config_file, workflow_type="train", **settings)
        workflow.initialize()
        evaluator = workflow.parser.get_parsed_content("validate#evaluator")
        metric = evaluator.state.key_metric_name if hasattr(evaluator.state, "key_metric_name") else "val_mean_dice"
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: history.append(
            float(engine.state.metrics[metric])))
        workflow.run()
        workflow.finalize()
    result = {"untrained": history[0], "trained": history[-1], "best": max(history)}
    print(f"validation mean Dice (foreground classes): untrained {result['untrained']:.4f}, "
          f"after training {result['trained']:.4f} (best {result['best']:.4f}); all: "
          + ", ".join(f"{value:.4f}" for value in history))
    return result


if __name__ == "__main__":
    fire.Fire(learning_check)
