"""ProtoNet, Matching and Relation Networks: scores by hand, gradients against finite differences
(float64) and an independent per-episode loop, vmap against loop, few-shot accuracy."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fedmeta.common.meta.matching import (
    MATCHING_FCE,
    matching_accuracy,
    matching_logits,
    matching_step,
)
from fedmeta.common.meta.protonet import protonet_accuracy, protonet_logits, protonet_step
from fedmeta.common.meta.relation import relation_logits, relation_step
from fedmeta.common.meta.types import TaskBatch
from fedmeta.common.models import build_model
from tests.common.reference import directional_fd, dot, leaf, random_like, single_thread


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with single_thread():
        yield


def _identity_embedding() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = build_model("linear", in_features=2, out_features=2).double()
    return model, {
        "linear.weight": torch.eye(2, dtype=torch.float64),
        "linear.bias": torch.zeros(2, dtype=torch.float64),
    }


def test_protonet_logits_by_hand() -> None:
    # Prototypes: class 0 = mean((0,0), (2,0)) = (1,0); class 1 = (0,2).
    # Query (1,1): squared distances 1 and 2; query (0,0): 1 and 4.
    model, theta = _identity_embedding()
    xs = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    ys = torch.tensor([0, 0, 1])
    xq = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    logits = protonet_logits(model, theta, xs, ys, xq, n_way=2)
    torch.testing.assert_close(logits, torch.tensor([[-1.0, -2.0], [-1.0, -4.0]], dtype=torch.float64))


def test_matching_log_probs_by_hand() -> None:
    # Query (1,0) against support (1,0)/0, (0,1)/1, (1,1)/0: cosines 1, 0, 1/√2.
    model, theta = _identity_embedding()
    xs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    ys = torch.tensor([0, 1, 0])
    xq = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    log_p = matching_logits(model, theta, xs, ys, xq, n_way=2)
    e = [math.exp(1.0), math.exp(0.0), math.exp(1 / math.sqrt(2))]
    expected = torch.tensor([[math.log((e[0] + e[2]) / sum(e)), math.log(e[1] / sum(e))]], dtype=torch.float64)
    torch.testing.assert_close(log_p, expected)


def test_relation_logits_match_the_modules_applied_pair_by_pair() -> None:
    torch.manual_seed(0)
    model = build_model("relation-mlp", in_features=3, hidden=(5,), embed=4, relation_hidden=6).double()
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    xs, ys, xq = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1]), torch.randn(4, 3, dtype=torch.float64)
    scores = relation_logits(model, theta, xs, ys, xq, n_way=3)
    zs, zq = model.encoder(xs), model.encoder(xq)
    for q in range(4):
        for k in range(3):
            c_k = sum(zs[i] for i in range(5) if ys[i] == k)
            expected = model.relation(torch.cat([c_k, zq[q]])[None])[0, 0]
            torch.testing.assert_close(scores[q, k], expected)


def _episodes(kind: str, n_tasks: int = 3, seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor], TaskBatch]:
    torch.manual_seed(seed)
    n_way, shots, queries = 3, 2, 2
    ys = torch.arange(n_way).repeat_interleave(shots).expand(n_tasks, -1).clone()
    yq = torch.arange(n_way).repeat_interleave(queries).expand(n_tasks, -1).clone()
    if kind == "conv":
        model = build_model("conv4", hidden=4, out_features=None, norm="batch", groups=2, image_size=16)
        shape = (1, 16, 16)
    elif kind == "relation":
        model = build_model("relation-mlp", in_features=4, hidden=(6,), embed=5, relation_hidden=4)
        shape = (4,)
    elif kind == "fce":
        model = build_model("context-embedding", encoder={"name": "mlp", "kwargs": {"in_features": 4, "hidden": [6],
                                                                                  "out_features": 5}}, dim=5, steps=2)
        shape = (4,)
    elif kind == "relation-conv":
        model = build_model("relation-conv4", hidden=4, norm="batch", groups=2, image_size=16, relation_hidden=3)
        shape = (1, 16, 16)
    else:
        model = build_model("mlp", in_features=4, hidden=(6,), out_features=5)
        shape = (4,)
    model = model.double()
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    episodes = TaskBatch(
        torch.randn(n_tasks, len(ys[0]), *shape, dtype=torch.float64), ys,
        torch.randn(n_tasks, len(yq[0]), *shape, dtype=torch.float64), yq,
    )
    return model, theta, episodes


def _torch_cell(p, name: str) -> torch.nn.LSTMCell:
    """PyTorch's own LSTM cell holding the weights of fedmeta's cell ``name`` (same gate order)."""
    w = p[f"{name}.ih.weight"]
    cell = torch.nn.LSTMCell(w.shape[1], w.shape[0] // 4).double()
    return cell, {"weight_ih": w, "weight_hh": p[f"{name}.hh.weight"], "bias_ih": p[f"{name}.ih.bias"],
                  "bias_hh": torch.zeros_like(p[f"{name}.ih.bias"])}


def _fce_embeddings(model, p, zs: torch.Tensor, zq: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vinyals et al.'s appendix A.2 with torch.nn.LSTMCell: g(x_i, S) and f(x̂, S)."""
    def run(name, x, state):  # type: ignore[no-untyped-def]
        cell, w = _torch_cell(p, name)
        return functional_call(cell, w, (x, state))

    fwd, bwd, state = [], [None] * len(zs), None
    for i in range(len(zs)):
        state = run("forward_cell", zs[i:i + 1], state)
        fwd.append(state[0][0])
    state = None
    for i in reversed(range(len(zs))):
        state = run("backward_cell", zs[i:i + 1], state)
        bwd[i] = state[0][0]
    g = zs + torch.stack(fwd) + torch.stack(bwd)
    h, c, r = torch.zeros_like(zq), torch.zeros_like(zq), torch.zeros_like(zq)
    for _ in range(steps):
        h_hat, c = run("query_cell", zq, (h + r, c))
        h = h_hat + zq
        r = torch.softmax(h @ g.T, dim=1) @ g
    return g, h


def _ref_objective(method: str, model, p, episodes: TaskBatch) -> torch.Tensor:
    """Mean query loss written per episode and per class from the papers, without the engine."""
    total = torch.zeros((), dtype=torch.float64)
    n_way = int(episodes.ys.max()) + 1
    for t in range(episodes.n_tasks):
        xs, ys, xq, yq = episodes.xs[t], episodes.ys[t], episodes.xq[t], episodes.yq[t]
        if method == "matching-fce":
            enc = {k[len("encoder."):]: v for k, v in p.items() if k.startswith("encoder.")}
            zs, zq = functional_call(model.encoder, enc, (xs,)), functional_call(model.encoder, enc, (xq,))
            g, f = _fce_embeddings(model, p, zs, zq, model.steps)
            att = torch.softmax(F.cosine_similarity(f[:, None], g[None], dim=2), dim=1)
            probs = torch.stack([att[:, ys == k].sum(1) for k in range(n_way)], dim=1)
            total = total + F.nll_loss(torch.log(probs), yq)
            continue
        if method == "relation":
            s1 = F.one_hot(ys, n_way).double()
            r = torch.sigmoid(functional_call(model, p, (xs, s1, xq)))
            total = total + ((r - F.one_hot(yq, n_way).double()) ** 2).mean()
            continue
        z = functional_call(model, p, (torch.cat([xs, xq]),)).flatten(1)
        zs, zq = z[: len(ys)], z[len(ys):]
        if method == "protonet":
            protos = torch.stack([zs[ys == k].mean(0) for k in range(n_way)])
            logits = -torch.cdist(zq, protos) ** 2
            total = total + F.cross_entropy(logits, yq)
        else:
            att = torch.softmax(F.cosine_similarity(zq[:, None], zs[None], dim=2), dim=1)
            probs = torch.stack([att[:, ys == k].sum(1) for k in range(n_way)], dim=1)
            total = total + F.nll_loss(torch.log(probs), yq)
    return total / episodes.n_tasks


STEPS = {"protonet": protonet_step, "matching": matching_step, "relation": relation_step,
         "matching-fce": MATCHING_FCE.step}
CASES = [("protonet", "mlp"), ("protonet", "conv"), ("matching", "mlp"), ("matching", "conv"), ("relation", "relation"),
         ("relation", "relation-conv"), ("matching-fce", "fce")]


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_gradient_matches_reference_and_finite_differences(method: str, kind: str) -> None:
    model, theta, episodes = _episodes(kind)
    grads = {impl: STEPS[method](model, theta, episodes, n_way=3, impl=impl) for impl in ("vmap", "loop")}
    p = leaf(theta)
    value = _ref_objective(method, model, p, episodes)
    reference = dict(zip(p, torch.autograd.grad(value, list(p.values())), strict=True))
    for impl, (grad, stats) in grads.items():
        for k in theta:
            torch.testing.assert_close(grad[k], reference[k], rtol=1e-7, atol=1e-10, msg=f"{impl} {k}")
        assert stats.query_loss_after / stats.n_query == pytest.approx(float(value.detach()))
    v = random_like(theta, torch.Generator().manual_seed(1))
    fd = directional_fd(lambda q: _ref_objective(method, model, q, episodes), theta, v)
    assert dot(grads["vmap"][0], v) == pytest.approx(fd, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("accuracy", [protonet_accuracy, matching_accuracy])
def test_accuracy_on_separable_episodes(accuracy) -> None:
    # Identity embedding; classes centred at (5, 0), (0, 5), (−5, −5) with small noise: all correct.
    model, theta = _identity_embedding()
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]], dtype=torch.float64)
    ys = torch.arange(3).repeat(2).expand(4, 6)
    yq = torch.arange(3).repeat(3).expand(4, 9)
    noise = lambda *s: 0.3 * torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    episodes = TaskBatch(centres[ys] + noise(4, 6, 2), ys, centres[yq] + noise(4, 9, 2), yq)
    assert accuracy(model, theta, episodes, n_way=3) == (36, 36)
    wrong = TaskBatch(episodes.xs, episodes.ys, episodes.xq, (episodes.yq + 1) % 3)
    assert accuracy(model, theta, wrong, n_way=3) == (0, 36)


def test_bad_episodes_are_rejected() -> None:
    model, theta, episodes = _episodes("mlp")
    with pytest.raises(ValueError, match="n_way must be an integer >= 2, got 1"):
        protonet_step(model, theta, episodes, n_way=1)
    with pytest.raises(ValueError, match=r"labels yq must lie in 0..1 for n_way=2, got range 0..2"):
        protonet_step(model, theta, TaskBatch(episodes.xs, episodes.ys % 2, episodes.xq, episodes.yq), n_way=2)
    ys = episodes.ys.clone()
    ys[1] = 0
    with pytest.raises(ValueError, match="episode 1 has no support example of class 1"):
        matching_step(model, theta, TaskBatch(episodes.xs, ys, episodes.xq, episodes.yq), n_way=3)
    with pytest.raises(ValueError, match="matching scale must be a finite number > 0, got -1"):
        matching_step(model, theta, episodes, n_way=3, scale=-1.0)
    with pytest.raises(ValueError, match="int64 class indices, got torch.float64"):
        protonet_step(model, theta, TaskBatch(episodes.xs, episodes.ys.double(), episodes.xq, episodes.yq), n_way=3)
