"""``--tracking mlflow`` (MONAI's default MLflow settings) on the pretraining and segmentation configs, with MLflow's
local store (an SQLite file under ``output_dir``: MLflow 3.13+ refuses the plain file store): the run holds the
training loss, the pretraining monitors and the validation metric. Skipped without the optional mlflow extra
(``pip install -c constraints.txt -r requirements-tracking.txt``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO_ROOT
from scripts.segmentation.embedded import prepare_segmentation_data
from test_seg_workflows import TINY, run, small_datalist, workflow

mlflow = pytest.importorskip("mlflow", reason="mlflow is an optional extra: pip install -r requirements-tracking.txt")

CONFIGS = REPO_ROOT / "configs"
PRETRAINING_MONITORS = ("knn_accuracy_at_start", "knn_accuracy", "embedding_std", "effective_rank",
                        "match_accuracy", "imle_nonzero_share", "imle_target_differs_share")


def _the_run(output_dir: Path) -> tuple[mlflow.tracking.MlflowClient, mlflow.entities.Run]:
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{output_dir / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("monai_experiment")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def _metrics_of_the_run(output_dir: Path) -> dict[str, list[float]]:
    client, run = _the_run(output_dir)
    return {name: [m.value for m in client.get_metric_history(run.info.run_id, name)] for name in run.data.metrics}


def _artifacts_of_the_run(output_dir: Path) -> list[str]:
    client, run = _the_run(output_dir)
    return sorted(item.path for item in client.list_artifacts(run.info.run_id))


def test_pretraining_run_logs_the_loss_and_the_monitors(tmp_path: Path) -> None:
    """One epoch of two iterations of 32 x 32 views: every monitor figure is an MLflow metric of the run."""
    output_dir = tmp_path / "run"
    flow = workflow("pretrain.json", "train", tracking="mlflow", output_dir=str(output_dir),
                    data_root=str(tmp_path / "data"), encoder_export_path=str(tmp_path / "encoder.pt"),
                    image_size=32, batch_size=8, max_epochs=1, monitor_interval=1, balance_modalities=False,
                    **{"train#trainer#epoch_length": 2})
    run(flow)
    metrics = _metrics_of_the_run(output_dir)
    assert len(metrics["train_loss"]) == 2  # one per iteration
    for name in PRETRAINING_MONITORS:
        assert name in metrics, sorted(metrics)
        assert len(metrics[name]) == 1
    assert 0.0 <= metrics["knn_accuracy"][0] <= 1.0


def test_segmentation_run_logs_the_loss_and_the_validation_dice(tmp_path: Path) -> None:
    data = Path(prepare_segmentation_data(tmp_path / "seg"))
    datalist = small_datalist(data, tmp_path, {"training": 4, "validation": 2, "test": 2})
    output_dir = tmp_path / "run"
    flow = workflow("train.json", "train", tracking="mlflow", dataset_dir=str(data), datalist_file=str(datalist),
                    output_dir=str(output_dir), best_model_path=str(tmp_path / "model.pt"),
                    max_epochs=1, val_interval=1, **TINY)
    run(flow)
    metrics = _metrics_of_the_run(output_dir)
    assert len(metrics["train_loss"]) == 1  # four images, batch of four
    assert "val_mean_dice" in metrics and 0.0 <= metrics["val_mean_dice"][0] <= 1.0
    # the resolved configuration as parameters, the final model as an artifact
    _, recorded = _the_run(output_dir)
    params = recorded.data.params
    assert len(params) > 30, sorted(params)
    assert params["image_size"] == str(TINY["image_size"]) and params["max_epochs"] == "1"
    assert params["learning_rate"] == "0.0003" and params["datalist_file"] == str(datalist)
    assert params["dataset_dir"] == str(data) and params["architecture"] == "unet_r50"
    assert not any(value.startswith("<") for value in params.values())  # objects are left out, not repr'd
    artifacts = _artifacts_of_the_run(output_dir)
    assert "model.pt" in artifacts, artifacts


def test_params_are_flattened_and_cut_to_mlflows_limits() -> None:
    from monai.bundle import ConfigParser

    from scripts.handlers.tracking import MAX_KEY_LENGTH, MAX_VALUE_LENGTH, config_params

    parser = ConfigParser({"a": 1, "names": {"0": "background", "1": "liver"}, "size": [32, 32],
                           "long": "x" * 7000, "k" * 300: 2, "net": {"_target_": "torch.nn.Identity"},
                           "unused": "$1 + 1", "run": ["$print(1)"]})
    for key in ("a", "names", "size", "long", "k" * 300, "net"):
        parser.get_parsed_content(key)
    params = config_params(parser)
    assert params == {"a": "1", "names.0": "background", "names.1": "liver", "size": "[32, 32]",
                      "long": "x" * MAX_VALUE_LENGTH, "k" * MAX_KEY_LENGTH: "2"}  # not evaluated: unused, run
