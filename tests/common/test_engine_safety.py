"""The automatic vmap/loop choice is never silently wrong: models the engine does not know are checked
once (vmap against the per-task loop, float64), fall back to the loop when the two differ, and every
resulting meta-gradient agrees with finite differences."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmeta.common.meta import engine
from fedmeta.common.meta.engine import (
    SAFE_MODULE_TYPES,
    choose_impl,
    is_known_safe,
    vmap_matches_loop,
)
from fedmeta.common.meta.maml import maml_step
from fedmeta.common.meta.types import InnerConfig, TaskBatch
from fedmeta.common.models import build_model
from tests.common.reference import (
    directional_fd,
    dot,
    leaf,
    random_like,
    ref_meta_loss,
    single_thread,
)


@pytest.fixture(autouse=True)
def _single_thread_and_fresh_verdicts() -> Iterator[None]:
    engine.forget_verdicts()
    with single_thread():
        yield
    engine.forget_verdicts()


class _Normed(nn.Module):
    """``Linear(4, 6) -> norm -> ReLU -> Linear(6, 3)``; subclasses choose the norm."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.weight = nn.Parameter(torch.ones(6))
        self.bias = nn.Parameter(torch.zeros(6))
        self.out = nn.Linear(6, 3)

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.norm(self.inp(x))))


class FunctionalLayerNorm(_Normed):
    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h, (6,), self.weight, self.bias)


class FunctionalBatchNorm(_Normed):
    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(h, None, None, self.weight, self.bias, training=True)


class PlainOpNorm(_Normed):
    def norm(self, h: torch.Tensor) -> torch.Tensor:
        mean = h.mean(dim=-1, keepdim=True)
        var = ((h - mean) ** 2).mean(dim=-1, keepdim=True)
        return (h - mean) / torch.sqrt(var + 1e-5) * self.weight + self.bias


class RandomForward(_Normed):
    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return F.dropout(h, p=0.5, training=True) * self.weight + self.bias


class DataDependent(_Normed):
    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.weight + (self.bias if bool(h.detach().sum() > 0) else -self.bias)


def _problem(cls: type[nn.Module], seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor], TaskBatch]:
    torch.manual_seed(seed)
    model = cls().double()
    with torch.no_grad():  # move the norm's affine parameters away from (1, 0)
        for name, p in model.named_parameters():
            if name in ("weight", "bias"):
                p.add_(0.3 * torch.randn_like(p))
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    tasks = TaskBatch(
        torch.randn(3, 6, 4, dtype=torch.float64), torch.randint(0, 3, (3, 6)),
        torch.randn(3, 5, 4, dtype=torch.float64), torch.randint(0, 3, (3, 5)),
    )
    return model, theta, tasks


@pytest.mark.parametrize(
    ("cls", "expected"),
    [(FunctionalLayerNorm, "loop"), (FunctionalBatchNorm, "loop"), (PlainOpNorm, "vmap")],
)
def test_auto_choice_and_its_meta_gradient_agree_with_finite_differences(
    cls: type[nn.Module], expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    model, theta, tasks = _problem(cls)
    inner = InnerConfig(steps=2, lr=0.3)
    with caplog.at_level(logging.INFO, logger="fedmeta.common.meta.engine"):
        assert choose_impl(model, "cpu", probe=tasks) == expected
    if expected == "loop":
        assert f"{cls.__name__} on cpu: second-order meta-gradients by vmap differ" in caplog.text
        assert "using the per-task loop" in caplog.text
    else:
        assert f"{cls.__name__} on cpu: vmap and the per-task loop agree" in caplog.text

    grad, _ = maml_step(model, theta, tasks, inner)  # impl="auto"

    def meta_loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return ref_meta_loss(model, p, tasks, steps=2, lr=0.3)

    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        v = random_like(theta, gen)
        assert dot(grad, v) == pytest.approx(directional_fd(meta_loss, theta, v), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("cls", [FunctionalLayerNorm, FunctionalBatchNorm])
def test_the_functional_norms_are_really_wrong_under_vmap(cls: type[nn.Module]) -> None:
    # Guards the test above: if torch fixed these kernels, the "loop" expectation would need revisiting.
    model, theta, tasks = _problem(cls)
    inner = InnerConfig(steps=2, lr=0.3)
    monkey = pytest.MonkeyPatch()
    monkey.setitem(engine._VERDICTS, (cls, torch.device("cpu")), "vmap")  # pretend it passed
    try:
        wrong, _ = maml_step(model, theta, tasks, inner, impl="vmap")
    finally:
        monkey.undo()
    p = leaf(theta)
    ref = dict(zip(p, torch.autograd.grad(ref_meta_loss(model, p, tasks, steps=2, lr=0.3), list(p.values())), strict=True))
    rel = sum(float(((wrong[k] - ref[k]) ** 2).sum()) for k in ref) ** 0.5 / sum(
        float((ref[k] ** 2).sum()) for k in ref
    ) ** 0.5
    assert rel > 1e-3


def test_the_check_runs_once_per_model_class_and_device(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = engine.vmap_matches_loop

    def counting(model: nn.Module, probe: TaskBatch, **kwargs: object) -> tuple[bool, str]:
        calls.append(type(model).__name__)
        return real(model, probe, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "vmap_matches_loop", counting)
    model, _, tasks = _problem(FunctionalLayerNorm)
    other, _, _ = _problem(FunctionalLayerNorm, seed=1)  # same class: cached verdict
    plain, _, _ = _problem(PlainOpNorm)
    assert choose_impl(model, "cpu", probe=tasks) == "loop"
    assert choose_impl(other, torch.device("cpu"), probe=tasks) == "loop"
    assert choose_impl(plain, "cpu", probe=tasks) == "vmap"
    assert choose_impl(plain, "cpu", probe=tasks) == "vmap"
    assert calls == ["FunctionalLayerNorm", "PlainOpNorm"]


def test_known_safe_models_are_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> tuple[bool, str]:
        raise AssertionError("a known-safe model was checked")

    monkeypatch.setattr(engine, "vmap_matches_loop", fail)
    _, _, tasks = _problem(PlainOpNorm)
    models = [
        build_model("mlp", in_features=4, hidden=(8, 8), out_features=3),
        build_model("linear", in_features=4, out_features=3),
        build_model("mlp", in_features=4, hidden=(8,), out_features=None),
        build_model("relation-mlp", in_features=4, hidden=(8,), embed=8),
        build_model("conv4", hidden=8, out_features=3, norm="batch"),
        build_model("conv4", hidden=8, out_features=3, norm="group"),
        build_model("relation-conv4", hidden=8, norm="batch"),
        nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.RMSNorm(8), nn.Dropout(0.1), nn.Linear(8, 3)),
    ]
    for model in models:
        assert is_known_safe(model), type(model).__name__
        assert choose_impl(model, "cuda", probe=tasks) == "vmap"
    assert choose_impl(models[0], "cpu", probe=tasks) == "vmap"


class _SubclassedLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.gain = nn.Parameter(1 + 0.3 * torch.randn(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(super().forward(x), (self.out_features,), self.gain)


def test_a_subclass_of_a_safe_type_is_not_known_safe() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_SubclassedLinear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    assert not is_known_safe(model)
    _, _, tasks = _problem(PlainOpNorm)
    assert choose_impl(model, "cpu", probe=tasks) == "loop"


def test_the_check_changes_neither_the_model_nor_the_random_state() -> None:
    class WithBuffers(FunctionalBatchNorm):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("seen", torch.zeros(()))

        def norm(self, h: torch.Tensor) -> torch.Tensor:
            self.seen.add_(1)
            return super().norm(h)

    model, _, tasks = _problem(WithBuffers)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    agrees, detail = vmap_matches_loop(model, tasks, device="cpu")
    assert not agrees and "differ from the per-task loop's" in detail
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.dtype == torch.float64 and not p.grad for p in model.parameters())


def test_a_random_forward_cannot_be_checked_and_runs_the_loop() -> None:
    model, _, tasks = _problem(RandomForward)
    agrees, detail = vmap_matches_loop(model, tasks, device="cpu")
    assert not agrees and "the forward pass is random" in detail
    assert choose_impl(model, "cpu", probe=tasks) == "loop"


def test_a_model_vmap_cannot_run_gets_the_loop() -> None:
    model, theta, tasks = _problem(DataDependent)
    agrees, detail = vmap_matches_loop(model, tasks, device="cpu")
    assert not agrees and detail.startswith("vmap failed")
    assert choose_impl(model, "cpu", probe=tasks) == "loop"
    grad, _ = maml_step(model, theta, tasks, InnerConfig(steps=1, lr=0.1))
    assert all(torch.isfinite(g).all() for g in grad.values())


def test_forced_vmap_is_refused_when_the_check_fails() -> None:
    model, theta, tasks = _problem(FunctionalLayerNorm)
    with pytest.raises(ValueError, match=r"impl='vmap' refused: FunctionalLayerNorm's second-order meta-gradients"):
        maml_step(model, theta, tasks, InnerConfig(steps=1), impl="vmap")
    # First order is right under vmap: allowed, no check needed.
    assert choose_impl(model, "cpu", "vmap", second_order=False) == "vmap"


def test_without_a_probe_an_unchecked_model_gets_the_loop() -> None:
    model, _, tasks = _problem(PlainOpNorm)
    assert choose_impl(model, "cpu") == "loop"
    assert choose_impl(model, "cpu", second_order=False) == "vmap"
    assert choose_impl(model, "cpu", probe=tasks) == "vmap"
    assert choose_impl(model, "cpu") == "vmap"  # the verdict is cached


# One tiny model per known-safe module type, each checked like an unknown model would be.
_SAFE_EXAMPLES: dict[type[nn.Module], Callable[[], nn.Module]] = {
    nn.Sequential: lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)),
    nn.Identity: lambda: nn.Sequential(nn.Linear(4, 6), nn.Identity(), nn.Sigmoid(), nn.Linear(6, 3)),
    nn.Linear: lambda: nn.Sequential(nn.Linear(4, 3)),
    nn.ReLU: lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)),
    nn.LeakyReLU: lambda: nn.Sequential(nn.Linear(4, 6), nn.LeakyReLU(0.1), nn.Linear(6, 3)),
    nn.ELU: lambda: nn.Sequential(nn.Linear(4, 6), nn.ELU(), nn.Linear(6, 3)),
    nn.GELU: lambda: nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3)),
    nn.SiLU: lambda: nn.Sequential(nn.Linear(4, 6), nn.SiLU(), nn.Linear(6, 3)),
    nn.Tanh: lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)),
    nn.Sigmoid: lambda: nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3)),
    nn.Softplus: lambda: nn.Sequential(nn.Linear(4, 6), nn.Softplus(), nn.Linear(6, 3)),
    nn.Dropout: lambda: nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.0), nn.Tanh(), nn.Linear(6, 3)),
    nn.GroupNorm: lambda: nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (6, 1)), nn.GroupNorm(2, 6), nn.Flatten(), nn.Linear(6, 3)),
    nn.RMSNorm: lambda: nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6), nn.Tanh(), nn.Linear(6, 3)),
    nn.Flatten: lambda: nn.Sequential(nn.Unflatten(1, (2, 2)), nn.Flatten(), nn.Linear(4, 3)),
    nn.Unflatten: lambda: nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.Tanh(), nn.Flatten(), nn.Linear(6, 3)),
    nn.Conv1d: lambda: nn.Sequential(nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)),
    nn.MaxPool1d: lambda: nn.Sequential(nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 2, 3, padding=1), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(4, 3)),
    nn.AvgPool1d: lambda: nn.Sequential(nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 2, 3, padding=1), nn.AvgPool1d(2), nn.Flatten(), nn.Linear(4, 3)),
    nn.Conv2d: lambda: nn.Sequential(nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)),
    nn.MaxPool2d: lambda: nn.Sequential(nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 3, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3, 3)),
    nn.AvgPool2d: lambda: nn.Sequential(nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 3, 3, padding=1), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3, 3)),
    nn.AdaptiveAvgPool2d: lambda: nn.Sequential(nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3)),
    nn.Conv3d: lambda: nn.Sequential(nn.Unflatten(1, (1, 1, 2, 2)), nn.Conv3d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)),
}


def _check_model(model: nn.Module) -> tuple[bool, str]:
    _, _, tasks = _problem(PlainOpNorm)
    return vmap_matches_loop(model.double(), tasks, device="cpu")


@pytest.mark.parametrize("kind", sorted(_SAFE_EXAMPLES, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_every_known_safe_type_passes_the_check(kind: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = _SAFE_EXAMPLES[kind]()
    assert any(type(m) is kind for m in model.modules())
    agrees, detail = _check_model(model)
    assert agrees, detail


@pytest.mark.parametrize("name", ["mlp", "linear", "relation-mlp", "conv4-batch", "conv4-group"])
def test_fedmeta_models_pass_the_check(name: str) -> None:
    torch.manual_seed(0)
    if name.startswith("conv4"):
        model = build_model("conv4", hidden=4, out_features=3, norm=name.split("-")[1], groups=2, image_size=16)

        class Images(nn.Module):  # the probe holds 4 features: reshape them into 16x16 images
            def __init__(self) -> None:
                super().__init__()
                self.net = model

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.net(x.repeat(1, 64).reshape(-1, 1, 16, 16))

        assert _check_model(Images())[0]
    elif name == "relation-mlp":
        relation = build_model("relation-mlp", in_features=4, hidden=(6,), embed=5)

        class Pairs(nn.Module):  # scores against a fixed one-hot "support" of the probe's examples
            def __init__(self) -> None:
                super().__init__()
                self.net = relation

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.net(x, torch.eye(x.shape[0], 3, dtype=x.dtype), x)[:, :3]

        assert _check_model(Pairs())[0]
    else:
        kwargs: dict[str, object] = {"in_features": 4, "out_features": 3}
        if name == "mlp":
            kwargs["hidden"] = (6, 5)
        assert _check_model(build_model(name, **kwargs))[0]


def test_every_listed_type_has_an_example() -> None:
    fedmeta_types = {t for t in SAFE_MODULE_TYPES if t.__module__.startswith("fedmeta.")}
    containers = {nn.ModuleList, nn.ModuleDict}  # no forward of their own
    assert SAFE_MODULE_TYPES - fedmeta_types - containers == set(_SAFE_EXAMPLES)
