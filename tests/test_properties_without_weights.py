"""Every inference and evaluation config passes MONAI's ``check_properties()`` without its weights file, as MONAI's
bundle tools and MONAI Label read a bundle before (or without) its weights: the weights are read in the config's
``run`` list, after ``scripts.required_weights.require_weights`` names the command that makes them."""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.bundle import ConfigWorkflow

from conftest import REPO_ROOT

pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")

# config -> (workflow type, key of its weights file, small sizes)
CONFIGS = {
    "inference.json": ("infer", "checkpoint", {"image_size": 32}),
    "evaluate.json": ("infer", "checkpoint", {"image_size": 32}),
    "inference_cls.json": ("infer", "model_path", {"image_size": 32}),
    "inference_det.json": ("infer", "model_path", {"image_size": 32}),
    "inference_prompt_seg.json": ("infer", "model_path", {"image_size": 64, "encoder_image_size": 64,
                                                          "encoder#embed_dim": 64, "encoder#depth": 2,
                                                          "encoder#num_heads": 2, "encoder#window_size": 4,
                                                          "encoder#global_attn_indexes": [1]}),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_properties_pass_without_the_weights_file(config: str, tmp_path: Path) -> None:
    workflow_type, weights_key, small = CONFIGS[config]
    missing = tmp_path / "missing.pt"
    flow = ConfigWorkflow(config_file=str(REPO_ROOT / "configs" / config), workflow_type=workflow_type,
                          logging_file=str(REPO_ROOT / "configs" / "logging.conf"), bundle_root=str(REPO_ROOT),
                          output_dir=str(tmp_path / "out"), **{weights_key: str(missing)}, **small)
    flow.initialize()
    assert flow.check_properties() == []
    assert flow.parser.get_parsed_content("network") is not None  # built, not loaded
    assert not missing.exists()
