"""Conversion of the official LVM-Med / SAM weight layouts, built here from this bundle's own modules with the
official key names and shapes (no download)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT
from scripts.convert_weights import convert_file, convert_state_dict, guess_kind, main
from scripts.networks.resnet_encoder import ResNet50Encoder
from scripts.networks.sam_mask_decoder import SamMaskDecoder
from scripts.networks.sam_prompt_encoder import SamPromptEncoder
from scripts.networks.sam_vit import sam_vit_b
from scripts.weights import WeightFileError, load_weights, read_state_dict, strip_prefixes, unwrap_state_dict


def _randomised(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Random values for the floating tensors, so a conversion that mixes up names is seen."""
    return {k: torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def torchvision_resnet50() -> dict[str, torch.Tensor]:
    """A torchvision resnet50 state dict: the encoder's keys plus the ImageNet head ``fc``."""
    state = _randomised(ResNet50Encoder().state_dict())
    state["fc.weight"] = torch.randn(1000, 2048)
    state["fc.bias"] = torch.randn(1000)
    return state


def _assert_same(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_resnet_release_layout_is_unwrapped_stripped_and_loads_strictly(tmp_path, torchvision_resnet50):
    wrapped = {
        "state_dict": {f"module.{k}": v for k, v in torchvision_resnet50.items()},
        "epoch": 99,
        "optimizer": {"lr": 0.1},
    }
    src = tmp_path / "lvmmed_resnet.torch"
    torch.save(wrapped, src)
    report = convert_file(src, tmp_path / "out" / "lvmmed_resnet.pt")

    converted = read_state_dict(tmp_path / "out" / "lvmmed_resnet.pt")
    _assert_same({k: v for k, v in torchvision_resnet50.items() if not k.startswith("fc.")}, converted)
    load = load_weights(ResNet50Encoder(), converted, source="converted")
    assert not load.missing and not load.unexpected
    text = str(report)
    assert report.kind == "resnet"
    assert 'unwrapped checkpoint["state_dict"] (left out: epoch, optimizer)' in text
    assert 'stripped prefix "module."' in text
    assert "fc.bias, fc.weight" in text


def test_backbone_prefix_keeps_only_the_backbone_and_names_what_was_dropped(torchvision_resnet50):
    state = {f"backbone.{k}": v for k, v in torchvision_resnet50.items()}
    state["projector.0.weight"] = torch.randn(4, 2048)
    stripped, notes = strip_prefixes({f"module.{k}": v for k, v in state.items()})
    assert set(stripped) == set(torchvision_resnet50)
    assert any("projector." in note and "dropped 1 key" in note for note in notes)
    assert guess_kind(stripped) == "resnet"


def test_old_files_without_batchnorm_counters_are_completed(torchvision_resnet50):
    old = {k: v for k, v in torchvision_resnet50.items() if not k.endswith("num_batches_tracked")}
    converted, report = convert_state_dict(old, "old.torch")
    assert all(converted[k].item() == 0 for k in converted if k.endswith("num_batches_tracked"))
    assert any("num_batches_tracked" in note for note in report.notes)


def test_a_shape_that_does_not_fit_is_refused_with_the_key_and_both_shapes(torchvision_resnet50):
    bad = dict(torchvision_resnet50)
    bad["conv1.weight"] = torch.randn(64, 1, 7, 7)  # a grey-scale stem
    with pytest.raises(WeightFileError, match=r"conv1\.weight: file \(64, 1, 7, 7\) vs network \(64, 3, 7, 7\)"):
        convert_state_dict(bad, "grey.torch", "resnet")


def test_unknown_keys_are_refused_not_dropped(torchvision_resnet50):
    extra = {**torchvision_resnet50, "layer5.0.conv1.weight": torch.randn(1)}
    with pytest.raises(WeightFileError, match="layer5.0.conv1.weight"):
        convert_state_dict(extra, "extra.torch")


def test_lvmmed_vit_layout_without_pos_embed_converts_to_sam_vit_b(tmp_path):
    release = _randomised(sam_vit_b().state_dict())
    assert "pos_embed" not in release
    src = tmp_path / "lvmmed_vit.pth"
    torch.save(release, src)
    report = convert_file(src, tmp_path / "lvmmed_vit.pt")
    assert report.kind == "vit"
    assert not report.parts["image_encoder"].missing and not report.parts["image_encoder"].unexpected
    _assert_same(release, read_state_dict(tmp_path / "lvmmed_vit.pt"))
    assert any("1024x1024" in note and "use_abs_pos=False" in note for note in report.notes)


@pytest.fixture(scope="module")
def sam_checkpoint() -> dict[str, torch.Tensor]:
    """``sam_vit_b_01ec64.pth``'s layout: SAM's three modules under their top-level names."""
    official: dict[str, torch.Tensor] = {}
    for part, module in (
        ("image_encoder", sam_vit_b(use_abs_pos=True)),
        ("prompt_encoder", SamPromptEncoder()),
        ("mask_decoder", SamMaskDecoder()),
    ):
        official.update({f"{part}.{k}": v for k, v in _randomised(module.state_dict()).items()})
    return official


def test_sam_checkpoint_layout_is_validated_part_by_part(tmp_path, sam_checkpoint):
    src = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(sam_checkpoint, src)
    report = convert_file(src, tmp_path / "sam_vit_b.pt")

    assert report.kind == "sam"
    assert set(report.parts) == {"image_encoder", "prompt_encoder", "mask_decoder"}
    assert all(not r.missing and not r.unexpected for r in report.parts.values())
    _assert_same(sam_checkpoint, read_state_dict(tmp_path / "sam_vit_b.pt"))


@pytest.mark.slow
def test_sam_checkpoint_gives_the_image_encoder_alone_and_refuses_a_missing_decoder_key(sam_checkpoint):
    converted, vit_report = convert_state_dict(sam_checkpoint, "sam_vit_b_01ec64.pth", "vit")
    assert "pos_embed" in converted and not any(k.startswith("mask_decoder") for k in converted)
    assert any("dropped mask_decoder., prompt_encoder." in note for note in vit_report.notes)

    broken = {k: v for k, v in sam_checkpoint.items() if k != "mask_decoder.iou_token.weight"}
    with pytest.raises(WeightFileError, match="iou_token.weight"):
        convert_state_dict(broken, "broken.pth")


@pytest.mark.parametrize(
    "checkpoint, message",
    [
        ([torch.zeros(1)], "holds a list, not a state dict"),
        ({"epoch": 3, "lr": 0.1}, "entries include: epoch, lr"),
        ({"state_dict": {"conv1.weight": torch.zeros(1), "step": 3}}, 'checkpoint\\["state_dict"\\].*step'),
    ],
)
def test_what_is_not_a_state_dict_is_refused_clearly(checkpoint, message):
    with pytest.raises(WeightFileError, match=message):
        unwrap_state_dict(checkpoint, "checkpoint")


class _Payload:
    """Pickles to a call of ``Path.touch`` on load, as a malicious checkpoint would run code."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "code_ran"
    src = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Payload(marker)}, src)
    with pytest.raises(WeightFileError, match="evil.pth is not a readable, weights-only torch file"):
        convert_file(src, tmp_path / "out.pt")
    assert not marker.exists()
    assert not (tmp_path / "out.pt").exists()


def test_command_line_converts_and_reports(tmp_path, capsys, torchvision_resnet50):
    src, dst = tmp_path / "lvmmed_resnet.torch", tmp_path / "lvmmed_resnet.pt"
    torch.save({"model": torchvision_resnet50}, src)
    assert main(["--src", str(src), "--dst", str(dst)]) == 0
    encoder_keys = len(torchvision_resnet50) - 2  # all but fc.weight and fc.bias
    assert f"encoder: {encoder_keys} tensors loaded, 0 missing, 0 unexpected" in capsys.readouterr().out
    assert dst.is_file()


def test_command_line_fails_with_a_message_not_a_traceback(tmp_path):
    command = [sys.executable, "-m", "scripts.convert_weights", "--src", str(tmp_path / "absent.pth"),
               "--dst", str(tmp_path / "out.pt")]
    failed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1
    assert "absent.pth does not exist" in failed.stderr and "Traceback" not in failed.stderr
    assert not (tmp_path / "out.pt").exists()
