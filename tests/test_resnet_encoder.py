from __future__ import annotations

import pytest
import torch

from scripts.networks.projector import ProjectionHead
from scripts.networks.resnet_encoder import ResNet50Encoder
from scripts.networks.ssl_network import LVMMedNetwork


def torchvision_resnet50_layout(in_channels: int = 3) -> dict[str, tuple[int, ...]]:
    """Key -> shape of torchvision's resnet50 state dict, without fc, written out from its architecture."""
    layout: dict[str, tuple[int, ...]] = {"conv1.weight": (64, in_channels, 7, 7)}

    def batch_norm(prefix: str, channels: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{prefix}.{name}"] = (channels,)
        layout[f"{prefix}.num_batches_tracked"] = ()

    batch_norm("bn1", 64)
    inplanes = 64
    for layer, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for block in range(blocks):
            prefix = f"layer{layer}.{block}"
            layout[f"{prefix}.conv1.weight"] = (planes, inplanes, 1, 1)
            batch_norm(f"{prefix}.bn1", planes)
            layout[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            batch_norm(f"{prefix}.bn2", planes)
            layout[f"{prefix}.conv3.weight"] = (planes * 4, planes, 1, 1)
            batch_norm(f"{prefix}.bn3", planes * 4)
            if block == 0:
                layout[f"{prefix}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                batch_norm(f"{prefix}.downsample.1", planes * 4)
            inplanes = planes * 4
    return layout


def test_state_dict_equals_torchvision_layout_key_for_key() -> None:
    encoder = ResNet50Encoder()
    actual = {key: tuple(value.shape) for key, value in encoder.state_dict().items()}
    assert actual == torchvision_resnet50_layout()
    assert list(actual) == list(torchvision_resnet50_layout())


def test_torchvision_style_state_dict_loads_strictly_and_is_used() -> None:
    encoder = ResNet50Encoder().eval()
    images = torch.randn(1, 3, 64, 64)
    before = encoder(images)[1]
    generator = torch.Generator().manual_seed(1)
    state = {
        key: (torch.randint(0, 5, shape, generator=generator) if key.endswith("num_batches_tracked")
              else torch.rand(shape, generator=generator) + 0.5)
        for key, shape in torchvision_resnet50_layout().items()
    }
    encoder.load_state_dict(state, strict=True)
    assert torch.equal(encoder.layer3[5].conv2.weight, state["layer3.5.conv2.weight"])
    assert not torch.allclose(encoder(images)[1], before)
    with_fc = dict(state, **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    with pytest.raises(RuntimeError, match="fc.weight"):
        encoder.load_state_dict(with_fc, strict=True)


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (70, 100)])
def test_returns_stride_32_feature_map_and_its_mean(size: tuple[int, int]) -> None:
    encoder = ResNet50Encoder().eval()
    feature_map, pooled = encoder(torch.randn(2, 3, *size))
    assert feature_map.shape == (2, 2048, -(-size[0] // 32), -(-size[1] // 32))
    torch.testing.assert_close(pooled, feature_map.mean(dim=(2, 3)))


def test_grey_input_channel_count_and_bad_shapes() -> None:
    assert ResNet50Encoder(in_channels=1).eval()(torch.randn(1, 1, 32, 32))[0].shape == (1, 2048, 1, 1)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\), got \(2, 1, 64, 64\)"):
        ResNet50Encoder()(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match="at least 32"):
        ResNet50Encoder()(torch.randn(2, 3, 16, 64))
    with pytest.raises(ValueError, match="in_channels"):
        ResNet50Encoder(in_channels=0)


def test_projector_default_is_the_papers_linear_map_and_hidden_layers_work() -> None:
    projector = ProjectionHead(2048, 128)
    assert [tuple(p.shape) for p in projector.parameters()] == [(128, 2048), (128,)]
    mlp = ProjectionHead(16, 8, hidden_features=(32,))
    assert mlp(torch.randn(4, 16)).shape == (4, 8)
    with pytest.raises(ValueError, match=r"\(N, 16\)"):
        mlp(torch.randn(4, 15))


def test_network_returns_feature_map_and_embeddings() -> None:
    network = LVMMedNetwork(ResNet50Encoder(), ProjectionHead(2048, 128))
    feature_map, embeddings = network(torch.randn(2, 3, 64, 64))
    assert feature_map.shape == (2, 2048, 2, 2) and embeddings.shape == (2, 128)
