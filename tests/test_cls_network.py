"""EncoderClassifier: linear probing keeps the encoder bit-identical, fine-tuning trains it; heads; weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.engines import SupervisedTrainer

from scripts.networks.classifier import EncoderClassifier
from scripts.weights import load_pretrained_encoder
from scripts.networks.resnet_encoder import ResNet50Encoder
from scripts.networks.sam_vit import SamViTEncoder
from scripts.weights import WeightFileError


def tiny_vit(**overrides) -> SamViTEncoder:
    settings = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, out_chans=8, window_size=2,
                    global_attn_indexes=(1,))
    settings.update(overrides)
    return SamViTEncoder(**settings)


def encoder_state(classifier: EncoderClassifier) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in classifier.encoder.state_dict(keep_vars=False).items()}


def train_a_few_steps(classifier: EncoderClassifier, steps: int = 3) -> None:
    batches = [{"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0])} for _ in range(steps)]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=batches, network=classifier,
        optimizer=torch.optim.Adam(classifier.trainable_parameters(), lr=1e-2),
        loss_function=torch.nn.CrossEntropyLoss(), decollate=False,
    )
    trainer.run()


def test_linear_probe_leaves_every_encoder_parameter_and_buffer_bit_identical() -> None:
    classifier = EncoderClassifier(ResNet50Encoder(), num_classes=3, freeze_encoder=True)
    before = encoder_state(classifier)
    head_before = [p.clone() for p in classifier.head.parameters()]
    assert any(key.endswith("running_mean") for key in before) and any(key.endswith("num_batches_tracked") for key in before)
    train_a_few_steps(classifier)
    after = classifier.encoder.state_dict()
    assert before.keys() == after.keys()
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert changed == []
    assert not classifier.encoder.training and classifier.training
    assert any(not torch.equal(a, b) for a, b in zip(head_before, classifier.head.parameters()))
    assert {id(p) for p in classifier.trainable_parameters()}.isdisjoint({id(p) for p in classifier.encoder.parameters()})


def test_fine_tuning_trains_the_encoder_and_its_batchnorm_statistics() -> None:
    classifier = EncoderClassifier(ResNet50Encoder(), num_classes=3, freeze_encoder=False)
    before = encoder_state(classifier)
    train_a_few_steps(classifier, steps=1)
    after = classifier.encoder.state_dict()
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])


def test_two_layer_head_and_vit_pooled_tokens() -> None:
    classifier = EncoderClassifier(tiny_vit(), num_classes=4, hidden_features=(12, 6), dropout=0.1)
    linears = [m for m in classifier.head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 12), (12, 6), (6, 4)]
    classifier.eval()
    images = torch.randn(2, 3, 32, 32)
    logits = classifier(images)
    assert logits.shape == (2, 4)
    pooled = classifier.encoder(images)[1]
    expected = classifier.head(classifier.feature_norm(pooled))
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("bad", [dict(num_classes=1), dict(hidden_features=(0,)), dict(dropout=1.0)])
def test_bad_arguments_are_named(bad: dict) -> None:
    arguments = dict(num_classes=3) | bad
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        EncoderClassifier(tiny_vit(), **arguments)


def test_load_pretrained_official_resnet_layout_ignores_fc(tmp_path: Path) -> None:
    source = ResNet50Encoder()
    state = dict(source.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    torch.save(state, tmp_path / "lvmmed_resnet.torch")
    target = load_pretrained_encoder(ResNet50Encoder(), tmp_path / "lvmmed_resnet.torch")
    assert all(torch.equal(value, target.state_dict()[key]) for key, value in source.state_dict().items())


def test_load_pretrained_finds_sam_image_encoder_prefix_and_names_bad_files(tmp_path: Path) -> None:
    source = tiny_vit()
    state = {f"image_encoder.{key}": value for key, value in source.state_dict().items()}
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 8)
    torch.save(state, tmp_path / "sam.pth")
    target = load_pretrained_encoder(tiny_vit(), tmp_path / "sam.pth")
    assert torch.equal(target.patch_embed.proj.weight, source.patch_embed.proj.weight)
    with pytest.raises(WeightFileError, match="sam.pth.*shape mismatch"):
        load_pretrained_encoder(tiny_vit(embed_dim=32), tmp_path / "sam.pth")
    with pytest.raises(WeightFileError, match="missing.pt"):
        load_pretrained_encoder(tiny_vit(), tmp_path / "missing.pt")
    assert load_pretrained_encoder(source, None) is source
