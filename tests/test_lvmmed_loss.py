from __future__ import annotations

import pytest
import torch

import scripts.objective.lvmmed_loss as lvmmed_loss_module
from scripts.networks.projector import ProjectionHead
from scripts.networks.resnet_encoder import ResNet50Encoder
from scripts.networks.sam_vit import SamViTEncoder
from scripts.networks.ssl_network import LVMMedNetwork
from scripts.objective.geometry import crop_grid
from scripts.objective.lvmmed_loss import LVMMedLoss
from scripts.objective.qap import GraphMatchingSolver, QAPBatch


def two_view_inputs(num_images: int, dim: int = 16, channels: int = 8, size: tuple[int, int] = (3, 3)):
    embeddings1, embeddings2 = torch.randn(num_images, dim), torch.randn(num_images, dim)
    features1, features2 = torch.randn(num_images, channels, *size), torch.randn(num_images, channels, *size)
    corners = torch.rand(num_images, 2) * 0.5
    boxes = torch.cat([corners, corners + 0.5], dim=1)
    grid1 = crop_grid(boxes, torch.zeros(num_images, dtype=torch.bool), size)
    grid2 = crop_grid(boxes.flip(0), torch.ones(num_images, dtype=torch.bool), size)
    return embeddings1, embeddings2, features1, features2, grid1, grid2


class Recorder:
    """Wraps imle_linear_loss to keep the problems the loss builds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.problems: list[QAPBatch] = []
        self.calls: list[dict] = []
        original = lvmmed_loss_module.imle_linear_loss

        def record(problem, solver, cost, lambda_, noise, noise_scale, margin, num_samples, **kwargs):
            self.problems.append(problem)
            self.calls.append({"solver": solver, "cost": cost, "lambda_": lambda_, "noise": noise, "margin": margin})
            return original(problem, solver, cost, lambda_, noise, noise_scale, margin, num_samples, **kwargs)

        monkeypatch.setattr(lvmmed_loss_module, "imle_linear_loss", record)


def test_every_image_takes_part_in_a_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch)
    loss_fn = LVMMedLoss(embedding_dim=16, gcn_features=(16, 16))
    loss = loss_fn(*two_view_inputs(37))
    assert [tuple(p.unary.shape) for p in recorder.problems] == [(1, 13, 13), (2, 12, 12)]
    # lambda is in affinity units whatever the number of graphs; the Hamming distance is <1 - 2 I, x> + n
    assert [call["lambda_"] for call in recorder.calls] == [loss_fn.lambda_, loss_fn.lambda_]
    for call, size in zip(recorder.calls, (13, 12)):
        torch.testing.assert_close(call["cost"], 1 - 2 * torch.eye(size))
    assert 0.0 <= loss.item() <= 2 * 13


def test_full_model_has_second_order_gcn_local_and_gumbel(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch)
    torch.manual_seed(0)
    inputs = two_view_inputs(16)
    loss_fn = LVMMedLoss(embedding_dim=16, gcn_features=(16, 16), noise_scale=1.0)
    loss_fn(*inputs)
    problem = recorder.problems[0]
    assert problem.pairwise.shape[1] > 0 and problem.pairwise.abs().sum() > 0
    assert recorder.calls[0]["noise"] == "gumbel"
    assert sum(p.numel() for p in loss_fn.parameters()) > 0
    losses = {loss_fn(*inputs).item() for _ in range(6)}
    assert len(losses) > 1  # Gumbel-perturbed matchings vary


def test_ablation_no_second_order_solves_a_linear_assignment(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch)
    LVMMedLoss(embedding_dim=16, gcn_features=(16, 16), second_order=False)(*two_view_inputs(16))
    problem = recorder.problems[0]
    assert problem.pairwise.shape == (1, 0, 0) and problem.edges1.shape == (1, 0, 2)
    assert recorder.calls[0]["solver"] is lvmmed_loss_module._linear_assignment_solver


def test_ablation_no_message_passing_matches_projector_embeddings(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch)
    inputs = two_view_inputs(8)
    loss_fn = LVMMedLoss(embedding_dim=16, message_passing=False, local_similarity=False)
    assert loss_fn.gcn is None and not list(loss_fn.parameters())
    loss_fn(*inputs[:2])
    expected = torch.nn.functional.normalize(inputs[0], dim=-1) @ torch.nn.functional.normalize(inputs[1], dim=-1).T
    torch.testing.assert_close(recorder.problems[0].unary[0], expected)


def test_ablation_no_local_similarity_uses_the_global_affinity_only(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch)
    torch.manual_seed(0)
    inputs = two_view_inputs(8)
    with_local = LVMMedLoss(embedding_dim=16, gcn_features=(16, 16))
    without_local = LVMMedLoss(embedding_dim=16, gcn_features=(16, 16), local_similarity=False)
    without_local.load_state_dict(with_local.state_dict())
    with_local(*inputs)
    without_local(*inputs[:2])  # feature maps are not needed any more
    full, ablated = recorder.problems[0].unary, recorder.problems[1].unary
    assert not torch.allclose(full, ablated)
    nodes1 = with_local.gcn(inputs[0][None], lvmmed_loss_module.knn_edges(inputs[0][None], 5))
    nodes2 = with_local.gcn(inputs[1][None], lvmmed_loss_module.knn_edges(inputs[1][None], 5))
    torch.testing.assert_close(ablated, lvmmed_loss_module.global_affinity(torch.cat([nodes1, nodes2])))


@pytest.mark.parametrize("noise", ["none", "gumbel"])
def test_ablation_no_gumbel_noise_solves_with_a_constant_margin(monkeypatch: pytest.MonkeyPatch, noise: str) -> None:
    """Ablation (iii) as the paper and BB-GM define it: no noise, the true-match affinities lowered by the margin."""
    recorder = Recorder(monkeypatch)
    solved: list[QAPBatch] = []
    exact = GraphMatchingSolver()

    def solver(problem: QAPBatch) -> torch.Tensor:
        solved.append(problem)
        return exact(problem)

    loss_fn = LVMMedLoss(embedding_dim=16, gcn_features=(16, 16), graph_size=8, noise=noise, margin=0.7, solver=solver)
    loss_fn(*two_view_inputs(8))
    built, given = recorder.problems[0], solved[0]
    assert recorder.calls[0]["noise"] == noise
    perturbed = given.unary[:1]  # the call stacks the perturbed problem, then the IMLE target
    margin_only = torch.equal(perturbed, built.unary - 0.7 * torch.eye(8)) and torch.equal(given.pairwise[:1], built.pairwise)
    assert margin_only == (noise == "none")


def test_the_margin_changes_the_unperturbed_matching() -> None:
    torch.manual_seed(3)
    e1, _, f1, _, g1, g2 = two_view_inputs(8)
    inputs = (e1, e1 + torch.randn_like(e1), f1, f1, g1, g1)  # views alike: the unperturbed matching is the truth
    matchings = []
    for margin in (0.0, 3.0):  # the edge term outweighs a margin of 1 on this near-complete 8-vertex graph
        loss_fn = LVMMedLoss(embedding_dim=16, gcn_features=(16, 16), graph_size=8, noise="none", margin=margin)
        torch.manual_seed(0)
        loss_fn.gcn.load_state_dict(LVMMedLoss(embedding_dim=16, gcn_features=(16, 16)).gcn.state_dict())
        loss_fn(*inputs)
        matchings.append(loss_fn._states[0].matching)
    assert matchings[0].diagonal(dim1=1, dim2=2).sum() > matchings[1].diagonal(dim1=1, dim2=2).sum()


def test_edge_weight_scales_the_second_order_term(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch)
    torch.manual_seed(0)
    inputs = two_view_inputs(8)
    one = LVMMedLoss(embedding_dim=16, gcn_features=(16, 16))
    half = LVMMedLoss(embedding_dim=16, gcn_features=(16, 16), edge_weight=0.5)
    half.load_state_dict(one.state_dict())
    one(*inputs)
    half(*inputs)
    torch.testing.assert_close(recorder.problems[1].pairwise, 0.5 * recorder.problems[0].pairwise)
    torch.testing.assert_close(recorder.problems[1].unary, recorder.problems[0].unary)


def test_local_affinity_keeps_the_best_matches_inside_both_crops(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch)
    torch.manual_seed(0)
    inputs = two_view_inputs(8, size=(4, 4))
    unaries = []
    for matches in (None, 3):
        loss_fn = LVMMedLoss(embedding_dim=16, gcn_features=(16, 16), alpha=0.0, local_num_matches=matches)
        loss_fn(*inputs)
        unaries.append(recorder.problems[-1].unary)
    # keeping the 3 best of 16 cells per term can only raise the mean of the cosines
    assert (unaries[1] >= unaries[0] - 1e-6).all() and (unaries[1] > unaries[0] + 1e-3).any()



def test_local_grid_size_pools_large_feature_maps() -> None:
    inputs = two_view_inputs(6, size=(8, 8))
    pooled = LVMMedLoss(embedding_dim=16, gcn_features=(16, 16), local_grid_size=2, noise="none")
    assert torch.isfinite(pooled(*inputs))


@pytest.mark.parametrize("kwargs,message", [
    ({"num_neighbors": 16}, "num_neighbors"), ({"graph_size": 1}, "graph_size"), ({"alpha": 1.5}, "alpha"),
    ({"alpha": -0.1}, "alpha"), ({"lambda_": 0.0}, "lambda_"), ({"noise": "uniform"}, "noise"),
    ({"num_samples": 0}, "num_samples"), ({"local_grid_size": 0}, "local_grid_size"),
    ({"local_grid_size": "big"}, "local_grid_size"), ({"local_num_matches": 0}, "local_num_matches"),
    ({"margin": -1.0}, "margin"), ({"edge_weight": -1.0}, "edge_weight"),
])
def test_bad_hyperparameters_are_refused_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LVMMedLoss(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"second_order": "no"}, "second_order must be bool"), ({"alpha": "0.5"}, "alpha must be float"),
    ({"graph_size": 16.0}, "graph_size must be int"), ({"num_samples": True}, "num_samples must be int"),
    ({"local_grid_size": 2.5}, "local_grid_size must be int or str or NoneType"),
])
def test_hyperparameters_of_the_wrong_type_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        LVMMedLoss(**kwargs)


def test_integers_are_accepted_for_float_hyperparameters() -> None:
    assert LVMMedLoss(alpha=1, lambda_=80, noise_scale=1).lambda_ == 80


def test_bad_inputs_name_the_problem() -> None:
    loss_fn = LVMMedLoss(embedding_dim=16, gcn_features=(16, 16))
    e1, e2, f1, f2, g1, g2 = two_view_inputs(8)
    with pytest.raises(ValueError, match=r"embeddings1 must have shape \(N, 16\), got \(8, 15\)"):
        loss_fn(e1[:, :15], e2, f1, f2, g1, g2)
    with pytest.raises(ValueError, match="needs features1"):
        loss_fn(e1, e2)
    with pytest.raises(ValueError, match=r"grid2 must have shape \(8, 3, 3, 2\)"):
        loss_fn(e1, e2, f1, f2, g1, g2[:, :2])
    with pytest.raises(ValueError, match="embeddings2 holds NaN"):
        loss_fn(e1, torch.full_like(e2, float("nan")), f1, f2, g1, g2)


@pytest.mark.parametrize("case", ["identical views", "duplicated images", "all zero", "small batch", "one image"])
def test_objective_is_finite_on_degenerate_batches(case: str) -> None:
    e1, e2, f1, f2, g1, g2 = two_view_inputs(8)
    if case == "identical views":
        e2, f2, g2 = e1, f1, g1
    elif case == "duplicated images":
        e1, e2, f1, f2 = (t[:1].expand_as(t).clone() for t in (e1, e2, f1, f2))
    elif case == "all zero":
        e1, e2, f1, f2 = (torch.zeros_like(t) for t in (e1, e2, f1, f2))
    elif case == "small batch":
        e1, e2, f1, f2, g1, g2 = (t[:3] for t in (e1, e2, f1, f2, g1, g2))
    else:
        e1, e2, f1, f2, g1, g2 = (t[:1] for t in (e1, e2, f1, f2, g1, g2))
    e1.requires_grad_(True)
    loss_fn = LVMMedLoss(embedding_dim=16, gcn_features=(16, 16))
    loss = loss_fn(e1, e2, f1, f2, g1, g2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(e1.grad).all()
    for parameter in loss_fn.parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all()


def run_objective(network: LVMMedNetwork, loss_fn: LVMMedLoss, image_size: int, num_images: int) -> torch.Tensor:
    view1, view2 = torch.randn(num_images, 3, image_size, image_size), torch.randn(num_images, 3, image_size, image_size)
    corners = torch.rand(num_images, 2) * 0.3
    boxes = torch.cat([corners, corners + 0.7], dim=1)
    features1, embeddings1 = network(view1)
    features2, embeddings2 = network(view2)
    grid1 = crop_grid(boxes, torch.rand(num_images) > 0.5, features1.shape[2:])
    grid2 = crop_grid(boxes.flip(0), torch.rand(num_images) > 0.5, features2.shape[2:])
    loss = loss_fn(embeddings1, embeddings2, features1, features2, grid1, grid2)
    loss.backward()
    return loss


def assert_finite_gradients_reach(module: torch.nn.Module, name: str) -> None:
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads), f"{name} has parameters without gradient"
    assert all(torch.isfinite(g).all() for g in grads), f"{name} has non-finite gradients"
    assert any(g.abs().sum() > 0 for g in grads), f"{name} received only zero gradients"


@pytest.mark.parametrize("encoder_name", ["resnet50", "small vit"])
def test_full_objective_trains_encoder_projector_and_gcn(encoder_name: str) -> None:
    torch.manual_seed(0)
    if encoder_name == "resnet50":
        encoder, image_size = ResNet50Encoder(), 64
    else:
        encoder = SamViTEncoder(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3,
                                out_chans=32, window_size=2, global_attn_indexes=(1,))
        image_size = 64
    network = LVMMedNetwork(encoder, ProjectionHead(encoder.out_channels, 128))
    loss_fn = LVMMedLoss()  # a random network mismatches most views
    loss = run_objective(network, loss_fn, image_size, num_images=18)
    assert torch.isfinite(loss) and loss.item() > 0
    assert_finite_gradients_reach(network.encoder, "encoder")
    assert_finite_gradients_reach(network.projector, "projector")
    assert_finite_gradients_reach(loss_fn.gcn, "GCN")


@pytest.mark.parametrize("ablation", [
    {}, {"second_order": False}, {"message_passing": False}, {"noise": "none"}, {"local_similarity": False},
    {"second_order": False, "message_passing": False, "noise": "none", "local_similarity": False},
])
def test_every_ablation_runs_forward_and_backward(ablation: dict) -> None:
    e1, e2, f1, f2, g1, g2 = two_view_inputs(20)
    e1.requires_grad_(True)
    f1.requires_grad_(True)
    loss_fn = LVMMedLoss(embedding_dim=16, gcn_features=(16, 16), noise_scale=1.0, **ablation)
    loss = loss_fn(e1, e2, f1, f2, g1, g2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(e1.grad).all() and e1.grad.abs().sum() > 0
    uses_local = ablation.get("local_similarity", True)
    assert (f1.grad is not None and f1.grad.abs().sum() > 0) == uses_local


def _edge_to_vertex_ratio(vertex_centring: bool, spread: float) -> float:
    """Median over seeds of the edge / vertex gradient-norm ratio at the GCN outputs, for 32 image pairs whose
    embeddings lie within about ``spread`` (relative) of a common vector, each view as far from its image as the
    images are from each other."""
    ratios = []
    for seed in range(5):
        torch.manual_seed(seed)
        loss_fn = LVMMedLoss(local_similarity=False, vertex_centring=vertex_centring)
        loss_fn.track_gradient_paths = True
        common, images = torch.randn(1, 128), torch.randn(32, 128)
        views = [(common + spread * (images + torch.randn(32, 128))).requires_grad_() for _ in range(2)]
        loss_fn(*views).backward()
        norms = loss_fn.last_gradient_norms
        ratios.append(float(norms["edge"] / norms["vertex"]))
    return float(torch.tensor(ratios).nanmedian())


def test_vertex_centring_keeps_the_edge_to_vertex_balance_as_embeddings_concentrate() -> None:
    """Uncentred, the vertex cosines' gradient shrinks with the embeddings' spread and the edge cosines' grows (the
    imbalance ``make demo`` showed growing with training); centred, both scale alike."""
    plain = _edge_to_vertex_ratio(False, 0.003) / _edge_to_vertex_ratio(False, 0.3)
    centred = _edge_to_vertex_ratio(True, 0.003) / _edge_to_vertex_ratio(True, 0.3)
    assert plain > 5.0
    assert centred < 2.0
