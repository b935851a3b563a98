"""The model zoo (fa_lab.tools.zoo): every architecture through register() matches
transformers' eager attention; the features the zoo relies on really change the answer;
gradients flow through the torch adapter, sinks included; sinks and MLA's d_v in float64
gradient checks."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (make test TORCH=0)")
transformers = pytest.importorskip("transformers", reason="the models extra")

import fa_lab.integrations.transformers as ftr  # noqa: E402
from fa_lab.integrations import torch as ft  # noqa: E402
from fa_lab.tools import zoo  # noqa: E402


@pytest.fixture(scope="module")
def registered():
    return ftr.register()


@pytest.mark.parametrize("arch", list(zoo.ZOO))
def test_every_zoo_model_matches_eager(registered, arch, monkeypatch):
    calls = []
    real = ftr.torch_attention
    monkeypatch.setattr(ftr, "torch_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    row = zoo.compare(arch, registered)
    assert calls, "fa_lab's attention function was never called"
    assert row["max_rel_logit_diff"] <= 1e-4, row
    assert row["same_tokens"], row


@pytest.mark.parametrize("arch", [a for a, off in zoo.FEATURE_OFF.items() if off])
def test_the_zoo_features_change_the_answer(arch):
    # otherwise matching eager would not show that fa_lab computes them
    assert zoo.feature_effect(arch) > 0.05


def test_sinks_take_probability_mass_in_every_layer():
    mass = zoo.sink_mass("gpt-oss")
    assert mass.shape == (2, 4)
    assert np.all((mass > 0) & (mass < 1))
    assert mass.max() > 0.1  # enough to matter (the weights are scaled for it)


def test_gpt_oss_gradients_through_the_adapter_match_eager(registered):
    ref = zoo.build("gpt-oss", "eager").train()
    mine = zoo.build("gpt-oss", registered, state=ref.state_dict()).train()
    ids, att = zoo.batch()
    grads = []
    for model in (ref, mine):
        model.zero_grad()
        logits = model(ids, attention_mask=att).logits
        (logits[att.bool()] ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    assert set(grads[0]) == set(grads[1])
    assert any(n.endswith("sinks") for n in grads[1])
    for name, g in grads[0].items():
        scale = g.abs().max().clamp_min(1e-12)
        assert ((g - grads[1][name]).abs().max() / scale).item() <= 1e-4, name


# --- float64 gradient checks: sinks and a value head dimension d_v != d ----------------

@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
@pytest.mark.parametrize("d_v", [3, 5])
def test_gradcheck_sinks_and_dv(causal, d_v):
    rng = np.random.default_rng(0)
    q = torch.tensor(rng.standard_normal((2, 4, 5, 3)), requires_grad=True)
    k = torch.tensor(rng.standard_normal((2, 2, 7, 3)), requires_grad=True)
    v = torch.tensor(rng.standard_normal((2, 2, 7, d_v)), requires_grad=True)
    sinks = torch.tensor(rng.standard_normal(4), requires_grad=True)
    mask = torch.tensor(rng.random((5, 7)) > 0.3)
    assert torch.autograd.gradcheck(
        lambda q, k, v, s: ft.attention(q, k, v, causal=causal, sinks=s, mask=mask),
        (q, k, v, sinks), eps=1e-6, atol=1e-7)


def test_transformers_passes_s_aux_and_refuses_what_it_cannot_compute(registered):
    fn = ftr.make_attention()
    q = torch.randn(1, 2, 4, 8)
    out, _ = fn(None, q, q, q, None, s_aux=torch.zeros(2))
    plain, _ = fn(None, q, q, q, None)
    assert not torch.allclose(out, plain)  # a sink of 0 takes mass: the output shrinks
    with pytest.raises(TypeError, match="made_up"):
        fn(None, q, q, q, None, made_up=1)
