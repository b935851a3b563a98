"""Agreement with torch.nn.functional.scaled_dot_product_attention (optional dependency)."""

import numpy as np
import pytest

import fa_lab
from fa_lab.numerics import reference
from fa_lab.numerics.testing import Case, assert_close

from conftest import block_kwargs

torch = pytest.importorskip("torch", reason="optional comparison; `make test TORCH=0` skips it")
F = torch.nn.functional


def sdpa(q, k, v, **kw):
    t = [torch.from_numpy(np.ascontiguousarray(x)) for x in (q, k, v)]
    with torch.no_grad():
        return F.scaled_dot_product_attention(*t, **kw).numpy()


@pytest.mark.parametrize("case", [
    Case(B=2, H=4, Nq=37, Nk=37, d=16, causal=True),
    Case(B=1, H=8, H_kv=2, Nq=50, Nk=50, d=64, causal=False),
    Case(B=1, H=4, H_kv=1, Nq=20, Nk=31, d=8, causal="bottom_right"),
], ids=lambda c: c.id)
def test_matches_torch_sdpa(kernel, case):
    q, k, v = case.inputs(np.float32, seed=2)
    gqa = case.H_kv is not None
    if case.causal == "bottom_right":  # torch's is_causal is top-left: pass the mask
        mask = reference.causal_mask(case.Nq, case.Nk, "bottom_right")
        expected = sdpa(q, k, v, attn_mask=torch.from_numpy(mask), enable_gqa=gqa)
    else:
        expected = sdpa(q, k, v, is_causal=bool(case.causal), enable_gqa=gqa)
    ours = fa_lab.attention(q, k, v, causal=case.causal, kernel=kernel,
                            **block_kwargs(kernel, 16, 16))
    exp64, _ = reference.attention(q, k, v, causal=case.causal)
    base, _ = reference.attention(q, k, v, causal=case.causal, dtype=np.float32)
    assert_close(expected, exp64, baseline=base, what="torch")  # torch is itself right
    np.testing.assert_allclose(ours, expected, rtol=0, atol=5e-6)


def test_float_mask_is_added_like_torch(kernel):
    q, k, v = Case(B=1, H=2, Nq=9, Nk=11, d=8).inputs(np.float32, seed=3)
    bias = np.random.default_rng(4).standard_normal((1, 2, 9, 11)).astype(np.float32)
    expected = sdpa(q, k, v, attn_mask=torch.from_numpy(bias))
    np.testing.assert_allclose(fa_lab.attention(q, k, v, mask=bias, kernel=kernel),
                               expected, atol=5e-6)
