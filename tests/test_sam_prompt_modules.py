"""SAM prompt encoder, mask decoder and the assembled MedSAM network: SAM's checkpoint layout and behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scripts.atomic_save import save_atomically
from scripts.networks.medsam import MedSAM, build_medsam, load_medsam_weights
from scripts.networks.sam_mask_decoder import SamMaskDecoder
from scripts.networks.sam_prompt_encoder import SamPromptEncoder
from scripts.networks.sam_vit import sam_vit_b
from scripts.weights import WeightFileError

TINY_ENCODER = {"embed_dim": 64, "depth": 2, "num_heads": 2, "window_size": 4, "global_attn_indexes": (1,)}

# SAM ViT-B checkpoint (sam_vit_b_01ec64.pth) layout of the prompt encoder and mask decoder, written out from the
# published architecture: width 256, mask_in_chans 16, two-way transformer depth 2 with MLP 2048 and cross-attention
# at half width, 4 mask tokens, hypernetwork MLPs 256-256-32, IoU head 256-256-4.
PROMPT_ENCODER_TABLE = {
    "pe_layer.positional_encoding_gaussian_matrix": (2, 128),
    **{f"point_embeddings.{i}.weight": (1, 256) for i in range(4)},
    "not_a_point_embed.weight": (1, 256),
    "mask_downscaling.0.weight": (4, 1, 2, 2), "mask_downscaling.0.bias": (4,),
    "mask_downscaling.1.weight": (4,), "mask_downscaling.1.bias": (4,),
    "mask_downscaling.3.weight": (16, 4, 2, 2), "mask_downscaling.3.bias": (16,),
    "mask_downscaling.4.weight": (16,), "mask_downscaling.4.bias": (16,),
    "mask_downscaling.6.weight": (256, 16, 1, 1), "mask_downscaling.6.bias": (256,),
    "no_mask_embed.weight": (1, 256),
}


def _attention(prefix: str, inner: int) -> dict[str, tuple[int, ...]]:
    table = {}
    for proj in ("q_proj", "k_proj", "v_proj"):
        table[f"{prefix}.{proj}.weight"], table[f"{prefix}.{proj}.bias"] = (inner, 256), (inner,)
    table[f"{prefix}.out_proj.weight"], table[f"{prefix}.out_proj.bias"] = (256, inner), (256,)
    return table


def _mask_decoder_table() -> dict[str, tuple[int, ...]]:
    table: dict[str, tuple[int, ...]] = {}
    for i in range(2):
        layer = f"transformer.layers.{i}"
        table |= _attention(f"{layer}.self_attn", 256)
        table |= _attention(f"{layer}.cross_attn_token_to_image", 128)
        table |= _attention(f"{layer}.cross_attn_image_to_token", 128)
        table |= {f"{layer}.mlp.lin1.weight": (2048, 256), f"{layer}.mlp.lin1.bias": (2048,),
                  f"{layer}.mlp.lin2.weight": (256, 2048), f"{layer}.mlp.lin2.bias": (256,)}
        for n in range(1, 5):
            table |= {f"{layer}.norm{n}.weight": (256,), f"{layer}.norm{n}.bias": (256,)}
    table |= _attention("transformer.final_attn_token_to_image", 128)
    table |= {"transformer.norm_final_attn.weight": (256,), "transformer.norm_final_attn.bias": (256,),
              "iou_token.weight": (1, 256), "mask_tokens.weight": (4, 256),
              "output_upscaling.0.weight": (256, 64, 2, 2), "output_upscaling.0.bias": (64,),
              "output_upscaling.1.weight": (64,), "output_upscaling.1.bias": (64,),
              "output_upscaling.3.weight": (64, 32, 2, 2), "output_upscaling.3.bias": (32,)}
    for i in range(4):
        for j, (out, inp) in enumerate(((256, 256), (256, 256), (32, 256))):
            mlp = f"output_hypernetworks_mlps.{i}.layers.{j}"
            table |= {f"{mlp}.weight": (out, inp), f"{mlp}.bias": (out,)}
    for j, (out, inp) in enumerate(((256, 256), (256, 256), (4, 256))):
        table |= {f"iou_prediction_head.layers.{j}.weight": (out, inp), f"iou_prediction_head.layers.{j}.bias": (out,)}
    return table


def _image_encoder_table() -> dict[str, tuple[int, ...]]:
    """SAM ViT-B image encoder at 1024 x 1024 with its absolute position embedding."""
    table: dict[str, tuple[int, ...]] = {"patch_embed.proj.weight": (768, 3, 16, 16), "patch_embed.proj.bias": (768,),
                                         "pos_embed": (1, 64, 64, 768)}
    for i in range(12):
        block = f"blocks.{i}"
        rel = 127 if i in (2, 5, 8, 11) else 27
        table |= {f"{block}.norm1.weight": (768,), f"{block}.norm1.bias": (768,),
                  f"{block}.attn.qkv.weight": (2304, 768), f"{block}.attn.qkv.bias": (2304,),
                  f"{block}.attn.proj.weight": (768, 768), f"{block}.attn.proj.bias": (768,),
                  f"{block}.attn.rel_pos_h": (rel, 64), f"{block}.attn.rel_pos_w": (rel, 64),
                  f"{block}.norm2.weight": (768,), f"{block}.norm2.bias": (768,),
                  f"{block}.mlp.lin1.weight": (3072, 768), f"{block}.mlp.lin1.bias": (3072,),
                  f"{block}.mlp.lin2.weight": (768, 3072), f"{block}.mlp.lin2.bias": (768,)}
    table |= {"neck.0.weight": (256, 768, 1, 1), "neck.1.weight": (256,), "neck.1.bias": (256,),
              "neck.2.weight": (256, 256, 3, 3), "neck.3.weight": (256,), "neck.3.bias": (256,)}
    return table


def _state(table: dict[str, tuple[int, ...]], prefix: str = "", seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {prefix + key: torch.randn(shape, generator=generator) for key, shape in table.items()}


def tiny_medsam(img_size: int = 64) -> MedSAM:
    return build_medsam(img_size, encoder=sam_vit_b(img_size, **TINY_ENCODER))


def test_prompt_encoder_and_mask_decoder_load_sam_vit_b_layout_strictly() -> None:
    prompt_encoder, mask_decoder = SamPromptEncoder(256, (64, 64), (1024, 1024), 16), SamMaskDecoder(256)
    prompt_state, decoder_state = _state(PROMPT_ENCODER_TABLE), _state(_mask_decoder_table())
    assert len(prompt_state) == 17 and len(decoder_state) == 120
    prompt_encoder.load_state_dict(prompt_state, strict=True)
    mask_decoder.load_state_dict(decoder_state, strict=True)
    assert torch.equal(mask_decoder.transformer.layers[1].cross_attn_image_to_token.v_proj.weight,
                       decoder_state["transformer.layers.1.cross_attn_image_to_token.v_proj.weight"])
    assert torch.equal(prompt_encoder.pe_layer.positional_encoding_gaussian_matrix,
                       prompt_state["pe_layer.positional_encoding_gaussian_matrix"])


def test_full_sam_vit_b_checkpoint_loads_into_medsam_and_image_encoder_into_sam_vit_b() -> None:
    encoder_state = _state(_image_encoder_table(), seed=2)
    encoder = sam_vit_b(1024, use_abs_pos=True)
    encoder.load_state_dict(encoder_state, strict=True)
    model = build_medsam(1024, encoder=encoder)
    checkpoint = {f"image_encoder.{k}": v for k, v in encoder_state.items()}
    checkpoint |= _state(PROMPT_ENCODER_TABLE, "prompt_encoder.") | _state(_mask_decoder_table(), "mask_decoder.")
    model.load_state_dict(checkpoint, strict=True)
    assert set(model.state_dict()) == set(checkpoint)


def test_load_medsam_weights_from_files_and_errors_name_the_file(tmp_path: Path) -> None:
    source = tiny_medsam()
    save_atomically(source.state_dict(), tmp_path / "medsam.pt")
    save_atomically({f"image_encoder.{k}": v for k, v in source.image_encoder.state_dict().items()}, tmp_path / "enc.pt")
    target = load_medsam_weights(tiny_medsam(), tmp_path / "medsam.pt")
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())
    encoder_only = load_medsam_weights(tiny_medsam(), encoder_weights=tmp_path / "enc.pt")
    assert torch.equal(encoder_only.image_encoder.neck[0].weight, source.image_encoder.neck[0].weight)
    assert not torch.equal(encoder_only.mask_decoder.iou_token.weight, source.mask_decoder.iou_token.weight)
    with pytest.raises(WeightFileError, match="enc.pt has no mask_decoder"):
        load_medsam_weights(tiny_medsam(), tmp_path / "enc.pt")
    with pytest.raises(WeightFileError, match="medsam.pt.*shape mismatch"):
        load_medsam_weights(build_medsam(64, encoder=sam_vit_b(64, **{**TINY_ENCODER, "embed_dim": 32})),
                            tmp_path / "medsam.pt")


def test_box_corner_encoding_matches_dense_positional_encoding_at_cell_centres() -> None:
    encoder = SamPromptEncoder(32, image_embedding_size=(4, 4), input_image_size=(64, 64))
    dense_pe = encoder.get_dense_pe()[0]  # (32, 4, 4)
    row, col = 1, 3
    centre = 16 * torch.tensor([col, row]) + 7.5  # pixel whose centre is the centre of cell (1, 3)
    sparse, dense = encoder(boxes=torch.cat([centre, centre]).reshape(1, 4))
    assert sparse.shape == (1, 2, 32) and dense.shape == (1, 32, 4, 4)
    torch.testing.assert_close(sparse[0, 0] - encoder.point_embeddings[2].weight[0], dense_pe[:, row, col])
    torch.testing.assert_close(sparse[0, 1] - encoder.point_embeddings[3].weight[0], dense_pe[:, row, col])
    torch.testing.assert_close(dense, encoder.no_mask_embed.weight.reshape(1, 32, 1, 1).expand(1, 32, 4, 4))


def test_points_are_padded_without_boxes_and_masks_are_encoded() -> None:
    encoder = SamPromptEncoder(32, image_embedding_size=(4, 4), input_image_size=(64, 64))
    points = (torch.tensor([[[10.0, 20.0], [30.0, 40.0]]]), torch.tensor([[1, 0]]))
    sparse, _ = encoder(points=points)
    assert sparse.shape == (1, 3, 32)
    torch.testing.assert_close(sparse[0, 2], encoder.not_a_point_embed.weight[0])
    sparse, dense = encoder(points=points, boxes=torch.tensor([[0.0, 0, 10, 10]]), masks=torch.randn(1, 1, 16, 16))
    assert sparse.shape == (1, 4, 32) and dense.shape == (1, 32, 4, 4)
    with pytest.raises(ValueError, match=r"masks must have shape \(B, 1, 16, 16\)"):
        encoder(masks=torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"boxes must have shape \(B, 4\)"):
        encoder(boxes=torch.zeros(1, 3))


def test_mask_decoder_shares_one_image_embedding_across_prompts() -> None:
    decoder = SamMaskDecoder(64).eval()
    image, pe = torch.randn(1, 64, 4, 4), torch.randn(1, 64, 4, 4)
    sparse, dense = torch.randn(3, 2, 64), torch.randn(3, 64, 4, 4)
    shared, iou = decoder(image, pe, sparse, dense)
    repeated, _ = decoder(image.expand(3, -1, -1, -1), pe, sparse, dense)
    assert shared.shape == (3, 1, 16, 16) and iou.shape == (3, 1)
    torch.testing.assert_close(shared, repeated)
    multi, multi_iou = decoder(image, pe, sparse, dense, multimask_output=True)
    assert multi.shape == (3, 3, 16, 16) and multi_iou.shape == (3, 3)
    with pytest.raises(ValueError, match="image embedding grid"):
        decoder(image, pe, sparse, torch.randn(3, 64, 8, 8))
    with pytest.raises(ValueError, match=r"batch 1 or that of the prompt tokens"):
        decoder(torch.randn(2, 64, 4, 4), pe, sparse, dense)


def test_medsam_freezes_encoders_and_checks_inputs() -> None:
    model = tiny_medsam().train()
    assert not model.image_encoder.training and not model.prompt_encoder.training and model.mask_decoder.training
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"mask_decoder"}
    images, boxes = torch.rand(2, 3, 64, 64), torch.tensor([[4.0, 4, 30, 40], [0, 0, 63, 63]])
    logits = model(images, boxes)
    assert logits.shape == (2, 1, 16, 16)
    torch.testing.assert_close(model(model.embed_images(images), boxes, embedded=True), logits)
    logits.mean().backward()
    assert model.mask_decoder.mask_tokens.weight.grad is not None
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert MedSAM.upsample(logits, (50, 70)).shape == (2, 1, 50, 70)
    with pytest.raises(ValueError, match="must be 64 x 64"):
        model(torch.rand(1, 3, 32, 32), boxes[:1])
    with pytest.raises(ValueError, match=r"boxes must have shape \(2, 4\)"):
        model(images, boxes[:, :3])
    with pytest.raises(ValueError, match="multiple of 16"):
        build_medsam(100)
