"""Every workflow config checks its user-facing values first thing in "initialize" (scripts/config_checks.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist
from monai.bundle import ConfigParser

from conftest import REPO_ROOT
from scripts.config_checks import SCHEMAS, ConfigValueError, ExistingPath, Number, Switch, check_values

OVERLAYS = {"multi_gpu_pretrain": "pretrain", "multi_gpu_train": "train"}


def config_files(name: str) -> list[str]:
    files = [name] if name not in OVERLAYS else [OVERLAYS[name], name]
    return [str(REPO_ROOT / "configs" / f"{file}.json") for file in files]


def parser_for(name: str, tmp_path: Path, **overrides) -> ConfigParser:
    """The config as MONAI's CLI builds it: files merged, then the overrides; required input files made to exist."""
    parser = ConfigParser()
    parser.read_config(config_files(name))
    for key, spec in SCHEMAS[name].items():
        if isinstance(spec, ExistingPath) and not spec.optional:
            (tmp_path / f"{key}.pt").touch()
            parser[key] = str(tmp_path / f"{key}.pt")
    parser.update(overrides)
    return parser


@pytest.fixture(scope="module", autouse=True)
def one_process_group(tmp_path_factory: pytest.TempPathFactory):
    """The DDP overlays check their values once the process group exists (num_workers depends on the world size)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg') / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def check_position(parser: ConfigParser) -> int:
    return next(i for i, item in enumerate(parser["initialize"]) if "config_checks.check_config" in item)


def run_check(parser: ConfigParser) -> None:
    """Evaluates the check's "initialize" expression, as ``ConfigWorkflow.initialize`` does."""
    try:
        parser.get_parsed_content(f"initialize#{check_position(parser)}")
    except RuntimeError as error:  # MONAI wraps what an expression raises
        raise error.__cause__ from None


def first_key(name: str, kind: type) -> str | None:
    return next((key for key, spec in SCHEMAS[name].items() if isinstance(spec, kind)), None)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_schema_key_is_in_its_config_and_the_check_runs_first(name: str) -> None:
    parser = ConfigParser()
    parser.read_config(config_files(name))
    assert [key for key in SCHEMAS[name] if key not in parser] == []
    # first, or right after the process group is set up in the DDP overlays
    joins = [i for i, item in enumerate(parser["initialize"]) if "init_distributed()" in item]
    assert check_position(parser) == (joins[0] + 1 if name in OVERLAYS else 0)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_defaults_pass_and_typed_overrides_are_checked(name: str, tmp_path: Path) -> None:
    run_check(parser_for(name, tmp_path))

    switch = first_key(name, Switch)
    if switch is not None:
        with pytest.raises(ConfigValueError, match=rf"{switch}='false' is a string.*`--{switch} False`"):
            run_check(parser_for(name, tmp_path, **{switch: "false"}))
    number = first_key(name, Number)
    with pytest.raises(ConfigValueError, match=rf"{number}='3' is a string, not an? (integer|number)"):
        run_check(parser_for(name, tmp_path, **{number: "3"}))
    path = first_key(name, ExistingPath)
    if path is not None:
        missing = str(tmp_path / "missing.pt")
        with pytest.raises(ConfigValueError, match=rf"{path}='{missing}': no such (file|folder)"):
            run_check(parser_for(name, tmp_path, **{path: missing}))


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_unknown_override_key_stops_with_near_matches(name: str, tmp_path: Path) -> None:
    misspelt = first_key(name, Number)[:-1]  # e.g. "batch_siz"
    with pytest.raises(ConfigValueError, match=rf"unknown config key {misspelt!r} \(set to 4\).*did you mean "
                                               rf"{first_key(name, Number)!r}"):
        run_check(parser_for(name, tmp_path, **{misspelt: 4}))


def test_the_keys_monais_tracking_adds_are_known(tmp_path: Path) -> None:
    run_check(parser_for("train", tmp_path, tracking_uri="sqlite:///x.db", experiment_name="e", run_name="r"))


def test_ranges_and_all_problems_are_reported_together(tmp_path: Path) -> None:
    parser = parser_for("train", tmp_path, batch_size=0, cache_rate=1.5, architecture="vgg", max_grad_norm=None)
    with pytest.raises(ConfigValueError) as caught:
        run_check(parser)
    message = str(caught.value)
    assert "batch_size=0 is out of range: must be >= 1" in message
    assert "cache_rate=1.5 is out of range: must be >= 0 and <= 1" in message
    assert "architecture='vgg' must be one of ['unet_r50', 'transunet']" in message
    assert "max_grad_norm" not in message  # optional: None is allowed


def test_bools_are_not_numbers_and_numbers_keep_their_kind() -> None:
    schema = {"interval": Number(1, integer=True), "rate": Number(0, exclusive_minimum=True)}
    assert check_values({"interval": 2, "rate": 1}, schema) == []
    assert check_values({"interval": True, "rate": 0.0}, schema) == [
        "interval=True must be an integer", "rate=0.0 is out of range: must be > 0"]
    assert check_values({"interval": 2.5}, schema) == ["interval=2.5 must be an integer"]


def test_the_bundles_overlays_add_no_unknown_keys() -> None:
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "configs" / "inference.json"), str(REPO_ROOT / "configs" / "inference_trt.json")])
    run_check(parser)
