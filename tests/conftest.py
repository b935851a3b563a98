"""Shared fixtures: the kernels under test come from the registry, never a local list."""

import numpy as np
import pytest

import fa_lab
from fa_lab.numerics import reference
from fa_lab.numerics.testing import assert_close, lse_magnitude

KERNEL_NAMES = list(fa_lab.KERNELS)
NUMBA_KERNELS = [n for n in KERNEL_NAMES if n != "reference"]
DTYPES = [np.float32, np.float64]


@pytest.fixture
def tune_file(tmp_path, monkeypatch):
    """A tuning file of the test's own (``FA_LAB_TUNE_FILE``), its reader's cache reset."""
    from fa_lab.tools import tune

    path = tmp_path / "tuned.json"
    monkeypatch.setenv("FA_LAB_TUNE_FILE", str(path))
    tune.reset_cache()
    yield path
    tune.reset_cache()


@pytest.fixture(params=KERNEL_NAMES)
def kernel(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=["f32", "f64"])
def dtype(request):
    return request.param


def block_kwargs(kernel, block_q=None, block_kv=None):
    """Block sizes only for kernels that take them (others refuse them by design)."""
    if fa_lab.KERNELS[kernel].tiled and (block_q or block_kv):
        return {"block_q": block_q, "block_kv": block_kv}
    return {}


def check_against_reference(kernel, q, k, v, **kw):
    """Run ``kernel`` and the reference; assert out and lse close by the tolerance table."""
    opts = {key: kw[key] for key in ("causal", "scale", "mask", "dropout_p", "seed", "window",
                                     "softcap", "alibi_slopes") if key in kw}
    out, lse = fa_lab.attention(q, k, v, kernel=kernel, return_lse=True, **kw)
    exp_out, exp_lse = reference.attention(q, k, v, **opts)
    base_out, base_lse = reference.attention(q, k, v, dtype=q.dtype.type, **opts)
    assert out.dtype == q.dtype and lse.dtype == q.dtype
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    assert_close(out, exp_out, baseline=base_out, what=f"{kernel} out",
                 magnitude=np.max(np.abs(v), initial=0.0) / (1 - kw.get("dropout_p", 0.0)))
    assert_close(lse, exp_lse, baseline=base_lse, what=f"{kernel} lse",
                 magnitude=lse_magnitude(exp_lse, q, k, kw.get("scale")))
    return out, lse


def dout_like(q, seed=1):
    """A fixed random upstream gradient ``dO`` of q's shape and dtype."""
    return np.random.default_rng(seed).standard_normal(q.shape).astype(q.dtype)


def check_grads(kernel, q, k, v, blocks=None, **opts):
    """Backward ``kernel`` against the float64 reference backward; float32 by the 3x rule,
    float64 to 1e-10. ``blocks`` (default 16 x 24) only for tiled kernels.

    The forward is pinned to ``tiled_simd`` (not ``auto``) so the test measures the
    backward kernel given one fixed forward; forward errors are the forward tests' job.
    """
    dout = dout_like(q)
    out, lse = fa_lab.attention(q, k, v, return_lse=True, kernel="tiled_simd", **opts)
    tiled = fa_lab.BACKWARD_KERNELS[kernel].tiled
    blocks = ({"block_q": 16, "block_kv": 24} if blocks is None else blocks) if tiled else {}
    got = fa_lab.attention_backward(q, k, v, out, lse, dout, kernel=kernel, **opts, **blocks)
    exp = reference.attention_backward(q, k, v, dout, **opts)
    base = reference.attention_backward(q, k, v, dout, dtype=q.dtype.type, **opts)
    for name, g, e, b, x in zip(("dq", "dk", "dv"), got, exp, base, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        if q.dtype == np.float64:
            assert np.max(np.abs(g - e), initial=0) <= 1e-10 * max(1, np.abs(e).max()), name
        else:
            assert_close(g, e, baseline=b, rule="float32_grad", what=f"{kernel} {name}")
    return got


def pytest_configure(config):
    # The tests' own plotting: headless, in this process only. (The environment variable
    # MPLBACKEND would reach the notebook kernels too and hide every lesson's figures.)
    import matplotlib

    matplotlib.use("Agg")


@pytest.fixture(params=[n for n, k in fa_lab.KERNELS.items() if k.window and k.softcap
                        and k.alibi])
def mod_kernel(request):
    """Kernels that support flash-attn's window, softcap and ALiBi (fa_lab.numerics.scoremod)."""
    return request.param
