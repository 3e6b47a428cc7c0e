"""Model registry, shapes and the plain-op batch norm."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmeta.common.models import BatchStatNorm2d, build_model, init_params
from tests.common.reference import single_thread


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with single_thread():
        yield


def test_mlp_shapes_and_parameter_names() -> None:
    model = build_model("mlp", in_features=13, hidden=(64, 64), out_features=2)
    assert model(torch.randn(5, 13)).shape == (5, 2)
    shapes = {k: tuple(v.shape) for k, v in init_params(model).items()}
    assert shapes == {
        "net.0.weight": (64, 13), "net.0.bias": (64,),
        "net.2.weight": (64, 64), "net.2.bias": (64,),
        "net.4.weight": (2, 64), "net.4.bias": (2,),
    }


def test_mlp_without_head_is_an_embedding() -> None:
    model = build_model("mlp", in_features=4, hidden=(8, 3), out_features=None)
    assert model(torch.randn(2, 4)).shape == (2, 3)


def test_linear_is_logistic_regression() -> None:
    torch.manual_seed(0)
    model = build_model("linear", in_features=3, out_features=2)
    x = torch.randn(4, 3)
    w, b = model.linear.weight, model.linear.bias
    torch.testing.assert_close(model(x), x @ w.T + b)


@pytest.mark.parametrize("norm", ["group", "batch", "none"])
def test_conv4_shapes(norm: str) -> None:
    model = build_model("conv4", in_channels=1, hidden=16, out_features=5, norm=norm)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 5)
    embed = build_model("conv4", in_channels=3, hidden=8, out_features=None, norm=norm, image_size=84)
    assert embed(torch.randn(2, 3, 84, 84)).shape == (2, 8 * 5 * 5)


def test_relation_models_score_every_query_class_pair() -> None:
    ys = F.one_hot(torch.arange(3).repeat(2), 3).float()
    conv = build_model("relation-conv4", hidden=8)
    assert conv(torch.randn(6, 1, 28, 28), ys, torch.randn(4, 1, 28, 28)).shape == (4, 3)
    mlp = build_model("relation-mlp", in_features=5, hidden=(8,), embed=4)
    assert mlp(torch.randn(6, 5), ys, torch.randn(7, 5)).shape == (7, 3)


def test_batch_stat_norm_matches_native_batch_norm_in_training_mode() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    ours = BatchStatNorm2d(4).double()
    native = nn.BatchNorm2d(4, track_running_stats=False).double()
    with torch.no_grad():
        ours.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        ours.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 3.0]))
        native.weight.copy_(ours.weight)
        native.bias.copy_(ours.bias)
    torch.testing.assert_close(ours(x), native(x))


def test_init_params_are_detached_clones() -> None:
    model = build_model("linear", in_features=2, out_features=2)
    params = init_params(model)
    assert all(not p.requires_grad for p in params.values())
    params["linear.weight"].add_(1.0)
    assert not torch.equal(params["linear.weight"], model.linear.weight.detach())


def test_build_model_rejects_bad_names_and_arguments() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet")
    with pytest.raises(ValueError, match="bad arguments for model 'mlp'"):
        build_model("mlp", in_features=3, colour="red")
    with pytest.raises(ValueError, match="in_features must be a positive integer, got 0"):
        build_model("mlp", in_features=0)
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        build_model("conv4", norm="layer")
    with pytest.raises(ValueError, match="image_size 8 is too small"):
        build_model("conv4", image_size=8)
    with pytest.raises(ValueError, match=r"channels \(6\) divisible by groups \(4\)"):
        build_model("conv4", hidden=6)


def test_one_model_spec_decides_the_network_for_training_and_for_the_bundle() -> None:
    """``ModelSpec.for_experiment`` is the one decision: ``build_model_for`` builds exactly it,
    an image head has one output per class for an algorithm whose record trains a plain
    classifier (FedAvg), none for a metric learner (the conv features embed) and ``ways`` outputs
    otherwise, and a wrong family is an error."""
    import pytest

    from fedmeta.common.config import load_config
    from fedmeta.common.data.registry import DataSpec
    from fedmeta.common.errors import ConfigError
    from fedmeta.common.experiment import build_model_for
    from fedmeta.common.models import ModelSpec

    images = DataSpec(kind="images", input_shape=(1, 28, 28), n_classes=12, sites=("a",))
    for algorithm, outputs in (("fedavg", 12), ("protonet", None), ("matching", None), ("reptile", 5)):
        cfg = load_config(None, [f"algorithm={algorithm}", "model.name=conv4", "model.hidden=[16]",
                                 "tasks.ways=5"])
        spec = ModelSpec.for_experiment(cfg, images)
        assert spec.kwargs["out_features"] == outputs and spec.kwargs["hidden"] == 16
        built = {k: tuple(v.shape) for k, v in build_model_for(cfg, images).state_dict().items()}
        assert built == {k: tuple(v.shape) for k, v in spec.build().state_dict().items()}
    tables = DataSpec(kind="tabular", input_shape=(13,), n_classes=2, sites=("a",))
    linear = ModelSpec.for_experiment(load_config(None, ["algorithm=reptile", "model.name=linear"]), tables)
    assert linear.to_dict() == {"name": "linear", "kwargs": {"in_features": 13, "out_features": 2}}
    with pytest.raises(ConfigError, match="conv4: needs image data"):
        ModelSpec.for_experiment(load_config(None, ["algorithm=reptile", "model.name=conv4"]), tables)
