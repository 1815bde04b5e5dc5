"""Checks of a workflow config's user-facing values before anything is built, and of unknown override keys.

MONAI's CLI merges ``--key value`` into the config without a word and passes ``--resume false`` as the
string ``"false"``, which is truthy. Every workflow config calls :func:`check_config` first in its
``"initialize"`` list; the user-facing keys of each config, their types and ranges, are declared once here
(:data:`SCHEMAS`), so the configs carry no copy of the checks.

MONAI gives a config expression no handle on the parser that evaluates it, and a ``ConfigWorkflow`` does
not keep its file names; :func:`check_config` therefore takes the parser from the call stack (the
``ConfigParser.get_parsed_content`` frame that evaluates the expression) and re-reads the bundle's own
config files to tell the keys written there from the ones added on the command line. A top-level key that none
of them defines (``--max_epoch 1`` for ``max_epochs``) stops the run with its near matches: MONAI would add it
silently and run with the default. The keys MONAI's experiment tracking (``--tracking``) adds are known too. MONAI's
CLI also drops every override whose value is None (``--monitor_interval None``): a ``monai.bundle`` command line
asking for None where the config holds a value stops the run with the value that does what was meant.
"""

from __future__ import annotations

import difflib
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

__all__ = ["SCHEMAS", "ConfigValueError", "Choice", "ExistingPath", "Integer", "Number", "Switch",
           "TRACKING_KEYS", "check_config", "evaluating_parser", "check_values", "unknown_keys",
           "dropped_none_overrides"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# top-level keys ``monai.bundle run --tracking NAME`` adds to a config (its settings' "configs" that are not handlers)
TRACKING_KEYS = tuple(dict.fromkeys(key for settings in DEFAULT_EXP_MGMT_SETTINGS.values()
                                    for key in settings["configs"] if key not in settings["handlers_id"]))


class ConfigValueError(ValueError):
    """One or more user-facing config values have the wrong type or are out of range, or a key is unknown; the
    message names each."""


@dataclass(frozen=True)
class Switch:
    """A bool. The strings "false"/"true" (what MONAI's CLI makes of ``--x false``) are refused."""

    def problem(self, key: str, value: Any) -> str | None:
        if isinstance(value, bool):
            return None
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "0", "1"):
            return (f"{key}={value!r} is a string, which is truthy whatever it says: give a bool "
                    f"(on the command line `--{key} {value.strip().lower() in ('true', 'yes', '1')}`)")
        return f"{key}={value!r} must be True or False"


@dataclass(frozen=True)
class Number:
    """A real number in ``[minimum, maximum]`` (``exclusive_minimum`` makes the lower end open); None when ``optional``."""

    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    optional: bool = False
    integer: bool = False

    def problem(self, key: str, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        wanted = "an integer" if self.integer else "a number"
        if isinstance(value, str):
            return f"{key}={value!r} is a string, not {wanted}: give the value without quotes (`--{key} {value}`)"
        kinds = (int,) if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return f"{key}={value!r} must be {wanted}{' or None' if self.optional else ''}"
        below = self.minimum is not None and (value <= self.minimum if self.exclusive_minimum else value < self.minimum)
        above = self.maximum is not None and value > self.maximum
        if below or above:
            low = "" if self.minimum is None else f"{'>' if self.exclusive_minimum else '>='} {self.minimum}"
            high = "" if self.maximum is None else f"<= {self.maximum}"
            return f"{key}={value!r} is out of range: must be {' and '.join(part for part in (low, high) if part)}"
        return None


def Integer(minimum: int | None = None, maximum: int | None = None, optional: bool = False) -> Number:
    """An integer in ``[minimum, maximum]``."""
    return Number(minimum, maximum, optional=optional, integer=True)


@dataclass(frozen=True)
class Choice:
    """One of ``choices``."""

    choices: tuple[Any, ...]

    def problem(self, key: str, value: Any) -> str | None:
        if value in self.choices:
            return None
        return f"{key}={value!r} must be one of {list(self.choices)}"


@dataclass(frozen=True)
class ExistingPath:
    """A path to an existing file (or folder with ``folder=True``); None or "" when ``optional``."""

    optional: bool = True
    folder: bool = False

    def problem(self, key: str, value: Any) -> str | None:
        if value in (None, "") and self.optional:
            return None
        if not isinstance(value, (str, os.PathLike)):
            return f"{key}={value!r} must be a path{' or None' if self.optional else ''}"
        exists = os.path.isdir(value) if self.folder else os.path.isfile(value)
        if not exists:
            return f"{key}={str(value)!r}: no such {'folder' if self.folder else 'file'}"
        return None


Spec = Switch | Number | Choice | ExistingPath

# keys shared by several workflows mean the same everywhere
_RUN = {
    "batch_size": Integer(1),
    "num_workers": Integer(0),
    "image_size": Integer(1),
}
_TRAIN = {
    **_RUN,
    "seed": Integer(0),
    "max_epochs": Integer(1),
    "learning_rate": Number(0, exclusive_minimum=True),
    "checkpoint_interval": Integer(1),
    "non_finite": Choice(("stop", "skip")),
    "pretrained_encoder": ExistingPath(),
    "resume": Switch(),
    "progress_bar": Switch(),
}
_SEGMENTATION = {
    "volumetric": Switch(),
    "architecture": Choice(("unet_r50", "transunet")),
    "in_channels": Integer(1),
    "num_classes": Integer(2),
    "slice_axis": Integer(0, 2),
    "dataset_dir": ExistingPath(folder=True),
    "datalist_file": ExistingPath(),
    "validation_fraction": Number(0, 1),
}
_INFERENCE = {"stop_on_error": Switch(), "progress_bar": Switch()}
_PROMPT = {
    "encoder_image_size": Integer(16),
    "encoder_use_abs_pos": Switch(),
}

SCHEMAS: dict[str, dict[str, Spec]] = {
    "pretrain": {
        **_TRAIN,
        "lr_halvings": Integer(0),
        "max_grad_norm": Number(0, optional=True),
        "log_interval": Integer(1),
        "monitor_interval": Integer(0, optional=True),
        "monitor_samples": Integer(1, optional=True),
        "knn_datalist": ExistingPath(),
        "balance_modalities": Switch(),
        "embedding_dim": Integer(1),
        "augmentation": Choice(("batched", "per_sample")),
        "source_size": Integer(2),
        "cache_rate": Number(0, 1),
    },
    "train": {
        **_TRAIN, **_SEGMENTATION,
        "val_interval": Integer(1),
        "validate_at_start": Switch(),
        "max_grad_norm": Number(0, optional=True),
        "log_interval": Integer(1),
        "cache_rate": Number(0, 1),
    },
    # the weights file is required when the run starts (scripts.required_weights names the command that makes it),
    # not at initialize, so that MONAI's checks and MONAI Label can read a bundle without its weights
    "evaluate": {**_RUN, **_SEGMENTATION, "seed": Integer(0), "progress_bar": Switch()},
    "inference": {**_RUN, **_SEGMENTATION, **_INFERENCE, "seed": Integer(0), "separate_folder": Switch(),
                  "dicom_seg": Switch()},
    "train_cls": {
        **_TRAIN,
        "dataset_dir": ExistingPath(folder=True),
        "validation_fraction": Number(0, 1, exclusive_minimum=True),
        "val_interval": Integer(1),
        "linear_probe": Switch(),
        "head_dropout": Number(0, 1),
    },
    "inference_cls": {
        **_RUN, **_INFERENCE,
        "seed": Integer(0),
        "validation_fraction": Number(0, 1, exclusive_minimum=True),
        "dataset_dir": ExistingPath(folder=True),
        "input_dir": ExistingPath(folder=True),
    },
    "train_det": {
        **_TRAIN,
        "training_images": Integer(1),
        "validation_images": Integer(1),
        "val_interval": Integer(1),
        "trainable_layers": Integer(0, 5),
        "fpn_channels": Integer(1),
    },
    "inference_det": {
        **_RUN, **_INFERENCE,
        "seed": Integer(0),
        "score_threshold": Number(0, 1),
        "input_dir": ExistingPath(folder=True),
    },
    "train_prompt_seg": {
        **_TRAIN, **_PROMPT,
        "skip_empty_masks": Switch(),
        "sam_checkpoint": ExistingPath(),
        "val_interval": Integer(1),
        "weight_decay": Number(0),
        "max_box_margin": Integer(0),
        "box_margin_reference_size": Integer(1),
        "log_interval": Integer(1),
    },
    "inference_prompt_seg": {
        **_PROMPT, **_INFERENCE,
        "image_size": Integer(1),
        "box_file": ExistingPath(),
        "encoder_weights": ExistingPath(),
        "mask_threshold": Number(),
    },
}
SCHEMAS["multi_gpu_pretrain"] = SCHEMAS["pretrain"]
SCHEMAS["multi_gpu_train"] = SCHEMAS["train"]


def check_values(values: Mapping[str, Any], schema: Mapping[str, Spec]) -> list[str]:
    """The problems of ``values`` (keys absent from ``values`` are not checked), one message per bad key."""
    return [message for key, spec in schema.items() if key in values
            if (message := spec.problem(key, values[key])) is not None]


def unknown_keys(keys: Sequence[str], known: Sequence[str]) -> dict[str, list[str]]:
    """``{key: near matches in known}`` for each of ``keys`` that is not in ``known`` (MONAI's ``_meta_`` aside)."""
    return {key: difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            for key in keys if key not in known and not key.startswith("_")}


def _top_level_keys(path: Path) -> list[str]:
    # "train#sampler" of an overlay adds to the top-level key "train", "+imports" to "imports"
    return [key.split("#")[0].lstrip("+") for key in ConfigParser.load_config_file(path)]


def _file_keys(config_names: Sequence[str]) -> list[str]:
    """The top-level keys of the named configs and of the bundle's overlays (configs without a "run" or an
    "initialize" of their own, e.g. ``pretrain_vit.json``, ``inference_trt.json``), which may be merged onto them."""
    keys: dict[str, None] = {}
    for name in config_names:
        path = CONFIG_DIR / f"{name}.json"
        if not path.is_file():
            raise ValueError(f"check_config: no config {path} for the name {name!r}")
        keys.update(dict.fromkeys(_top_level_keys(path)))
    for path in sorted(CONFIG_DIR.glob("*.json")):
        if path.name != "metadata.json" and not {"run", "initialize"} & set(_top_level_keys(path)):
            keys.update(dict.fromkeys(_top_level_keys(path)))
    return list(keys)


# the value that turns off what None turns off, for the keys that have one (MONAI's command line drops None)
_OFF_VALUES = {"monitor_interval": 0, "max_grad_norm": 0}


def dropped_none_overrides(argv: Sequence[str], config: ConfigParser | Mapping[str, Any]) -> list[str]:
    """One message per ``--key None`` (or ``--key=None``) of a ``monai.bundle`` command line whose key the config sets
    to something else: MONAI's CLI ignores override values that parse to None (``update_kwargs(ignore_none=True)``),
    so the run would keep the config's value without a word.

    Args:
        argv: the command line, ``sys.argv`` of ``python -m monai.bundle run ...``.
        config: the merged config (after MONAI applied the overrides it kept): a parser, whose ids may be nested
            (``train#trainer#epoch_length``), or a mapping of top-level keys.
    """
    requested: list[str] = []
    for position, token in enumerate(argv):
        if not token.startswith("--"):
            continue
        key, separator, value = token[2:].partition("=")
        if not separator:
            value = argv[position + 1] if position + 1 < len(argv) else ""
        if value == "None" and key in config and config[key] is not None:
            requested.append(key)
    messages = []
    for key in dict.fromkeys(requested):
        remedy = (f"`--{key} {_OFF_VALUES[key]}` turns it off" if key in _OFF_VALUES else
                  "set it to null in a config file added with --config_file, or give another value")
        messages.append(f"`--{key} None` is ignored by MONAI's command line (it drops None values) and the run would "
                        f"keep {key}={config[key]!r}: {remedy}")
    return messages


def _is_bundle_command_line(argv: Sequence[str]) -> bool:
    """True for ``python -m monai.bundle ...`` (argv[0] is then the path of ``monai/bundle/__main__.py``)."""
    return bool(argv) and Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "bundle"


def evaluating_parser() -> ConfigParser:
    """The ``ConfigParser`` evaluating the config expression that (indirectly) calls this, found on the call stack."""
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, ConfigParser):
            return candidate
        frame = frame.f_back
    raise RuntimeError("must be called from a config expression (e.g. the config's 'initialize' or 'run' list)")


def check_config(*config_names: str, parser: ConfigParser | None = None) -> None:
    """Checks the config being run: each top-level key must be defined by one of the bundle's files
    ``configs/{name}.json`` (or added by MONAI's ``--tracking``), and each user-facing value of
    ``SCHEMAS[config_names[0]]`` must have its type and range.

    Args:
        config_names: the config files merged for this run, without ``.json`` (e.g. ``"pretrain",
            "multi_gpu_pretrain"``); the first one's schema is used.
        parser: the parser of the config; by default the one evaluating the expression that calls this.

    Raises:
        ConfigValueError: naming every unknown key with its near matches (an override with a typo), or else every
            bad value with what it must be.
    """
    if not config_names or config_names[0] not in SCHEMAS:
        raise ValueError(f"check_config needs a config name among {sorted(SCHEMAS)}, got {config_names!r}")
    parser = parser if parser is not None else evaluating_parser()
    present = [key for key in parser.config if isinstance(key, str)]
    files = ", ".join(f"configs/{name}.json" for name in config_names)
    unknown = unknown_keys(present, [*_file_keys(config_names), *TRACKING_KEYS])
    if unknown:
        raise ConfigValueError("; ".join(
            f"unknown config key {key!r} (set to {parser.config[key]!r}) is not in {files}"
            + (f": did you mean {' or '.join(repr(m) for m in matches)}?" if matches else
               ": the workflow would not read it")
            for key, matches in unknown.items()))
    if _is_bundle_command_line(sys.argv):
        dropped = dropped_none_overrides(sys.argv, parser)
        if dropped:
            raise ConfigValueError("; ".join(dropped))
    schema = SCHEMAS[config_names[0]]
    # the resolver already parsing this expression resolves the values (get_parsed_content could re-parse)
    values = {key: parser.ref_resolver.get_resolved_content(key) for key in schema if key in parser}
    problems = check_values(values, schema)
    if problems:
        raise ConfigValueError(f"configs/{config_names[0]}.json: " + "; ".join(problems))
