"""What ``--tracking mlflow`` records beyond MONAI's defaults: the resolved configuration as parameters, the run's
final model and metrics files as artifacts, and the loss of a trainer that keeps its batch output whole.

MONAI's default MLflow settings (``monai.bundle.utils.DEFAULT_MLFLOW_SETTINGS``) append an ``MLFlowHandler`` to
``train#handlers`` (and to ``validate#handlers`` and ``handlers``) that logs two parameters (``max_epochs``,
``epoch_length``), the losses and ``engine.state.metrics``, and the executed config file as its one artifact.
Every training and evaluation config runs :func:`track_run` first in its ``run`` list; without ``--tracking`` there
is no such handler and nothing changes. It gives each ``MLFlowHandler`` of the engine:

- the parameters: every top-level value of the config that the run resolved (names, numbers, paths, small lists
  and dicts flattened to ``key.sub``), rendered as text and cut to MLflow's limits (keys of 250 characters, values
  of 6000, 100 parameters per request), logged when the engine starts (after MONAI's handler opens the run);
  expressions the run did not evaluate are not evaluated here, and objects (networks, transforms) are left out;
- the artifacts: the files given (e.g. ``models/model.pt``, ``metrics.json``), uploaded by MONAI's handler when
  the engine completes, those that exist then;
- for a trainer, an iteration loss that reads a whole-batch output dict (``decollate=False``, as in pretraining)
  as well as MONAI's decollated list: MONAI's ``from_engine(['loss'], first=True)`` returns a one-element tuple for
  a whole-batch dict, which MLflow cannot log.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.engines import Trainer
from monai.handlers import MLFlowHandler, from_engine

from scripts.config_checks import evaluating_parser

__all__ = ["MAX_KEY_LENGTH", "MAX_PARAMS_PER_REQUEST", "MAX_VALUE_LENGTH", "config_params", "track_run"]

# MLflow's limits (mlflow.utils.validation: MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH);
# mlflow is an optional extra, so they are written here
MAX_KEY_LENGTH = 250
MAX_VALUE_LENGTH = 6000
MAX_PARAMS_PER_REQUEST = 100
_NOT_PARAMETERS = ("imports", "initialize", "run", "finalize")
_DECOLLATED_LOSS = from_engine(["loss"], first=True)


def _loss(output: Any) -> Any:
    """The ``loss`` entry of an engine output: a whole-batch dict, or a decollated list of per-sample dicts."""
    return output["loss"] if isinstance(output, Mapping) else _DECOLLATED_LOSS(output)


def _flatten(key: str, value: Any, params: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        for name, item in value.items():
            _flatten(f"{key}.{name}", item, params)
    elif value is None or isinstance(value, (bool, int, float, str, Path, torch.device)):
        params[key] = str(value)
    elif isinstance(value, (list, tuple)) and all(
            item is None or isinstance(item, (bool, int, float, str, Path)) for item in value):
        params[key] = str(list(value))


def config_params(parser: ConfigParser) -> dict[str, str]:
    """``{name: value as text}`` of the top-level values of ``parser``'s config that its resolver has resolved
    (plain values, and lists and dicts of them flattened), within MLflow's key and value lengths."""
    resolved = parser.ref_resolver.resolved_content
    params: dict[str, str] = {}
    for key in parser.config:
        if isinstance(key, str) and key in resolved and key not in _NOT_PARAMETERS and not key.startswith("_"):
            _flatten(key, resolved[key], params)
    return {key[:MAX_KEY_LENGTH]: value[:MAX_VALUE_LENGTH] for key, value in params.items()}


class _ParamLogger:
    """At the engine's start, after ``handler.start`` opened the MLflow run: logs ``params`` not yet in the run
    (a run MONAI's handler picks up again keeps its values; MLflow refuses to change one), in batches."""

    def __init__(self, handler: MLFlowHandler, params: Mapping[str, str]) -> None:
        self.handler = handler
        self.params = dict(params)

    def __call__(self, engine: Engine) -> None:
        import mlflow  # present whenever MONAI built an MLFlowHandler

        run_id = self.handler.cur_run.info.run_id
        logged = self.handler.client.get_run(run_id).data.params
        new = [mlflow.entities.Param(key, value) for key, value in self.params.items() if key not in logged]
        for start in range(0, len(new), MAX_PARAMS_PER_REQUEST):
            self.handler.client.log_batch(run_id=run_id, params=new[start:start + MAX_PARAMS_PER_REQUEST])


def track_run(engine: Engine, handlers: Iterable[Any], artifacts: Sequence[str | os.PathLike] = (),
              parser: ConfigParser | None = None) -> int:
    """Gives each ``MLFlowHandler`` among ``handlers`` (attached to ``engine``) the config's parameters, the
    ``artifacts`` and, for a trainer, the loss of whole-batch outputs.

    Args:
        engine: the trainer or evaluator the handlers are attached to (``@train#trainer``, ``@evaluator``).
        handlers: its instantiated handlers (``@train#handlers``, ``@handlers``).
        artifacts: files to upload when the engine completes, e.g. the final model and the metrics files.
        parser: the config's parser; by default the one evaluating the config expression that calls this.

    Returns:
        how many MLflow handlers were set up (0 without ``--tracking mlflow``).
    """
    mlflow_handlers = [handler for handler in handlers if isinstance(handler, MLFlowHandler)]
    if not mlflow_handlers:
        return 0
    params = config_params(parser if parser is not None else evaluating_parser())
    for handler in mlflow_handlers:
        if isinstance(engine, Trainer):
            handler.output_transform = _loss
        handler.artifacts = (*(a for a in handler.artifacts if a), *(os.fspath(a) for a in artifacts))
        engine.add_event_handler(Events.STARTED, _ParamLogger(handler, params))
    return len(mlflow_handlers)
