"""Site-side computation: choosing adaptation steps on the site's own held-out rows."""

import numpy as np
import torch

from fedmeta.common.config import load_config
from fedmeta.common.models import build_model
from fedmeta.sitecore.evaluate import choose_adapt_steps


def _linear(d):
    model = build_model("linear", in_features=d, out_features=2)
    params = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    return model, params


def test_separable_signal_uses_every_step():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(80, 3)).astype(np.float32))
    y = (x[:, 0] > 0).long()
    model, params = _linear(3)
    cfg = load_config(None, ["eval.adapt_steps=40", "eval.adapt_lr=0.5"])
    assert choose_adapt_steps(cfg, model, params, x, y, rng=rng) == 40


def test_pure_noise_stays_at_the_initialisation():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(24, 20)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 2, 24))
    model, params = _linear(20)
    cfg = load_config(None, ["eval.adapt_steps=200", "eval.adapt_lr=1.0"])
    # Fitting 18 noisy rows in 20 dimensions only memorises them: the held-out loss is lowest early.
    assert choose_adapt_steps(cfg, model, params, x, y, rng=rng) <= 20


def test_off_or_too_few_rows_falls_back_to_the_configured_steps():
    x = torch.zeros(6, 2)
    y = torch.tensor([0, 0, 0, 0, 0, 1])
    model, params = _linear(2)
    rng = np.random.default_rng(0)
    assert choose_adapt_steps(load_config(None, ["eval.adapt_steps=7"]), model, params, x, y, rng=rng) == 7
    cfg = load_config(None, ["eval.adapt_steps=9", "eval.validation_fraction=0"])
    y2 = torch.tensor([0, 1] * 3)
    assert choose_adapt_steps(cfg, model, params, x, y2, rng=rng) == 9
