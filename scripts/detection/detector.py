"""MONAI's RetinaNet detector on an LVM-Med ResNet-50 feature pyramid, configured for 2D images."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher

from scripts.detection.backbone import ResNetFPNBackbone

__all__ = ["ATSSRetinaNetDetector", "BOX_KEY", "LABEL_KEY", "SCORE_KEY", "build_retinanet_detector"]

BOX_KEY, LABEL_KEY = "box", "label"
SCORE_KEY = f"{LABEL_KEY}_scores"  # the key RetinaNetDetector derives from the label key


class ATSSRetinaNetDetector(RetinaNetDetector):
    """MONAI's ``RetinaNetDetector`` restricted to its ATSS matcher, so that it trains without torchvision.

    ``RetinaNetDetector.compute_anchor_matched_idxs`` first asks ``isinstance(matcher, Matcher)`` with
    torchvision's ``Matcher``, an optional import that raises when torchvision is missing, even when the ATSS
    matcher is set. This override keeps only the ATSS branch (same computation as MONAI's); everything else is
    MONAI's detector unchanged. The hard negative sampler is checked first in MONAI's sampling code, so it needs
    no change.
    """

    def compute_anchor_matched_idxs(
        self, anchors: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], num_anchor_locs_per_level: Sequence[int]
    ) -> list[torch.Tensor]:
        """Matched box index of every anchor of every image, or -1 (unmatched); see MONAI's method."""
        if not isinstance(getattr(self, "proposal_matcher", None), ATSSMatcher):
            raise ValueError("ATSSRetinaNetDetector needs the ATSS matcher: call set_atss_matcher() before training")
        matched = []
        for anchors_per_image, targets_per_image in zip(anchors, targets):
            boxes = targets_per_image[self.target_box_key].to(anchors_per_image.device)
            if boxes.numel() == 0:
                matched.append(torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64,
                                          device=anchors_per_image.device))
                continue
            _, matched_per_image = self.proposal_matcher(
                boxes, anchors_per_image, num_anchor_locs_per_level, self.num_anchors_per_loc
            )
            if torch.max(matched_per_image) < 0:
                warnings.warn(f"no anchor matches the ground-truth boxes {boxes.tolist()}; adjust the anchor shapes")
            matched.append(matched_per_image)
        return matched


def build_retinanet_detector(
    backbone: ResNetFPNBackbone,
    num_classes: int,
    *,
    base_anchor_shapes: Sequence[Sequence[int]] = ((8, 8), (6, 12), (12, 6)),
    size_divisible: int = 32,
    atss_candidates: int = 4,
    negatives_per_image: int = 64,
    positive_fraction: float = 0.3,
    score_threshold: float = 0.02,
    nms_threshold: float = 0.22,
    detections_per_image: int = 100,
) -> ATSSRetinaNetDetector:
    """A ``RetinaNetDetector`` (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017) as MONAI builds
    it, with only MONAI components: ``RetinaNet`` heads on the given feature pyramid, anchors from
    ``AnchorGeneratorWithAnchorShape``, the ATSS matcher (Zhang et al., CVPR 2020) and the hard negative sampler
    (torchvision's ``Matcher`` and ``BalancedPositiveNegativeSampler``, which the detector's other setters use,
    are not installed).

    Targets and predictions use the keys ``"box"`` ((N, 4) boxes in MONAI's ``StandardMode`` for 2D, i.e.
    ``[min along axis 0, min along axis 1, max along axis 0, max along axis 1]`` of the (C, H, W) image: row
    first), ``"label"`` ((N,) class indices) and, for predictions, ``"label_scores"``.

    Args:
        backbone: the feature extractor; its number of pyramid levels sets the anchor scales (x1, x2, x4 ...).
        num_classes: foreground classes.
        base_anchor_shapes: (height, width) anchors of the finest level, in pixels; coarser levels double them.
        size_divisible: images are padded to multiples of this (the coarsest level's stride).
        atss_candidates: anchors per level that ATSS considers for each box.
        negatives_per_image: sampled anchors per image for the classification loss.
        positive_fraction: share of positives among them.
        score_threshold: detections below this score are dropped.
        nms_threshold: IoU above which non-maximum suppression removes the weaker box.
        detections_per_image: most detections kept per image.

    Example::

        detector = build_retinanet_detector(ResNetFPNBackbone(ResNet50Encoder(), returned_layers=(1, 2)), 1)
        losses = detector([image], [{"box": boxes, "label": labels}])  # training mode: classification, box_regression
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    levels = len(backbone.returned_layers) + 1  # the FPN adds a max-pooled level
    anchor_generator = AnchorGeneratorWithAnchorShape(
        feature_map_scales=[2**level for level in range(levels)],
        base_anchor_shapes=[tuple(shape) for shape in base_anchor_shapes],
    )
    network = RetinaNet(
        spatial_dims=2,
        num_classes=num_classes,
        num_anchors=anchor_generator.num_anchors_per_location()[0],
        feature_extractor=backbone,
        size_divisible=size_divisible,
    )
    detector = ATSSRetinaNetDetector(network=network, anchor_generator=anchor_generator)
    detector.set_atss_matcher(num_candidates=atss_candidates, center_in_gt=False)
    detector.set_hard_negative_sampler(
        batch_size_per_image=negatives_per_image, positive_fraction=positive_fraction, pool_size=20, min_neg=16
    )
    detector.set_target_keys(box_key=BOX_KEY, label_key=LABEL_KEY)
    detector.set_box_selector_parameters(
        score_thresh=score_threshold,
        topk_candidates_per_level=1000,
        nms_thresh=nms_threshold,
        detections_per_img=detections_per_image,
    )
    return detector
