"""``flash``'s two ``P V`` paths (BLAS, fa_lab's float32 micro-kernel): the micro-kernel
against NumPy on one tile (panels, tail rows, a strided V) and against the float64
reference on awkward shapes (GQA, masks, both causal alignments, windows, d_v != d), the
NaN rule, what it refuses, and ``kernel="auto"`` running the path the tuning file
measured faster (planted times; only the last test times, to check the tuner stores
both paths, not which wins)."""

import dataclasses

import numpy as np
import pytest

import fa_lab
from fa_lab.kernels.ladder import pv_product
from fa_lab.numerics import reference
from fa_lab.numerics.testing import Case
from fa_lab.registry import KERNELS
from fa_lab.settings import config
from fa_lab.tools import tune

from conftest import check_against_reference

MICRO = dict(kernel="flash", pv="microkernel")


@pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")  # np.dot, strided V
@pytest.mark.parametrize("br,bc,d", [(13, 300, 64), (8, 128, 32), (3, 129, 96), (16, 1, 32)])
def test_one_tile_against_numpy(br, bc, d):
    """acc = alpha acc + P V: strips of 8 rows and the rest, V panels of 128 keys (the
    rescale once), V read through a strided view, as the varlen layout passes it."""
    rng = np.random.default_rng(br * bc + d)
    P_buf = rng.random(br * bc + 7).astype(np.float32)  # longer than the tile, as flash's
    P = P_buf[:br * bc].reshape(br, bc)
    V3 = rng.standard_normal((bc, 2, d)).astype(np.float32)
    Vj = V3[:, 1]  # rows d * 2 floats apart
    acc0 = rng.standard_normal((br, d)).astype(np.float32)
    alpha = rng.random(br).astype(np.float32)
    acc, PV = acc0.copy(), np.empty((br, d), np.float32)
    pv_product._own(P_buf, P, Vj, PV, np.empty(bc * d, np.float32), alpha, acc)
    want = alpha[:, None].astype(np.float64) * acc0 + P.astype(np.float64) @ Vj
    np.testing.assert_allclose(acc, want, rtol=2e-5, atol=2e-5 * np.sqrt(bc))
    with pytest.raises(ValueError, match="Vpack"):
        pv_product._own(P_buf, P, Vj, PV, np.empty(bc * d - 1, np.float32), alpha, acc)
    acc = acc0.copy()  # an empty Vpack is the BLAS path
    pv_product._own(P_buf, P, Vj, PV, np.empty(0, np.float32), alpha, acc)
    np.testing.assert_allclose(acc, want, rtol=2e-5, atol=2e-5 * np.sqrt(bc))


def test_the_microkernel_really_runs_and_differs_from_blas_in_rounding_only():
    q, k, v = Case(H=2, Nq=300, d=64).inputs(np.float32, seed=9)
    micro = fa_lab.attention(q, k, v, **MICRO)
    blas = fa_lab.attention(q, k, v, kernel="flash", pv="blas")
    assert not np.array_equal(micro, blas)  # another summation order: the path ran
    np.testing.assert_allclose(micro, blas, atol=1e-5)
    assert np.array_equal(blas, fa_lab.attention(q, k, v, kernel="flash"))  # the default
    qb, kb, vb = (np.ascontiguousarray(np.swapaxes(x, 1, 2)) for x in (q, k, v))
    out = fa_lab.attention(qb, kb, vb, layout="bnhd", **MICRO)
    np.testing.assert_array_equal(out, np.swapaxes(micro, 1, 2))


def test_a_call_that_splits_its_keys_runs_blas_and_refuses_the_microkernel(tune_file):
    import json

    q, k, v = Case(H=1, Nq=20, Nk=4096, d=64).inputs(np.float32)  # one task: it splits
    assert fa_lab.plan(q, k, v, kernel="flash")["splits"] > 1
    with pytest.raises(ValueError, match="splits its keys"):
        fa_lab.attention(q, k, v, **MICRO)
    tune_file.write_text(json.dumps(_planted("microkernel")))
    p = fa_lab.plan(q, k, v)
    assert p["pv"] == "blas" and p["pv_from"].startswith("split-KV")
    np.testing.assert_allclose(fa_lab.attention(q, k, v), reference.attention(q, k, v)[0],
                               atol=2e-5)  # auto: the measured path, but not where it splits


def test_without_the_jit_the_microkernel_is_refused(monkeypatch):
    monkeypatch.setattr(pv_product.numba_config, "DISABLE_JIT", True)
    assert "NUMBA_DISABLE_JIT" in pv_product.serves("microkernel", np.float32, 64)
    assert pv_product.serves("blas", np.float32, 64) is None


@pytest.mark.parametrize("case", [
    Case(Nq=1, Nk=5, d=32),
    Case(Nq=9, Nk=33, d=32, block_q=8, block_kv=16),       # one strip of 8 and a tail row
    Case(Nq=77, Nk=133, d=64, causal=True, block_q=64, block_kv=128),
    Case(Nq=127, d=64, causal="bottom_right", block_q=64, block_kv=48),
    Case(Nq=17, Nk=113, d=128, causal=True, block_q=5, block_kv=8),  # every row a tail
    Case(B=2, H=4, H_kv=2, Nq=64, Nk=127, d=32, causal="bottom_right", block_q=16,
         block_kv=16),                                      # grouped-query
    Case(B=3, H=4, H_kv=1, Nq=300, Nk=300, d=64),           # MQA, default tiles
], ids=lambda c: c.id)
def test_microkernel_matches_the_reference(case):
    q, k, v = case.inputs(np.float32, seed=5)
    blocks = {n: getattr(case, n) for n in ("block_q", "block_kv") if getattr(case, n)}
    check_against_reference("flash", q, k, v, causal=case.causal, pv="microkernel", **blocks)


def test_microkernel_with_masks_window_and_value_dim():
    q, k, v = Case(B=2, H=2, Nq=41, Nk=70, d=64).inputs(np.float32, seed=1)
    mask = np.random.default_rng(2).random((2, 2, 41, 70)) < 0.8
    check_against_reference("flash", q, k, v, mask=mask, causal=True, pv="microkernel",
                            block_q=16, block_kv=32)
    check_against_reference("flash", q, k, v, window=(9, 3), pv="microkernel", block_q=16,
                            block_kv=32)
    v96 = np.random.default_rng(3).standard_normal((2, 2, 70, 96)).astype(np.float32)
    out = fa_lab.attention(q, k, v96, causal=True, **MICRO)  # d_v = 96, d = 64
    np.testing.assert_allclose(out, reference.attention(q, k, v96, causal=True)[0], atol=2e-5)


def test_hidden_nan_values_stay_hidden_and_visible_ones_reach_their_rows():
    q, k, v = Case(Nq=40, Nk=40, d=32).inputs(np.float32, seed=4)
    v[0, 0, 30] = np.nan  # a key only rows 30.. see under a causal mask
    out = fa_lab.attention(q, k, v, causal=True, block_q=16, block_kv=16, **MICRO)
    assert np.isfinite(out[0, 0, :30]).all() and np.isnan(out[0, 0, 30:]).all()
    out = fa_lab.attention(q, k, v, block_q=16, block_kv=16, **MICRO)  # no mask: every row
    assert np.isnan(out[0, 0]).all() and np.isfinite(out[0, 1]).all()  # head 1 has no NaN


def test_what_the_microkernel_refuses_by_name():
    q, k, v = Case(Nq=16, d=64).inputs(np.float64)
    with pytest.raises(ValueError, match="pv='microkernel' needs float32"):
        fa_lab.attention(q, k, v, **MICRO)
    q, k, v = Case(Nq=16, d=80).inputs(np.float32)
    with pytest.raises(ValueError, match="multiple of 32"):
        fa_lab.attention(q, k, v, **MICRO)
    with pytest.raises(ValueError, match="pv: one of"):
        fa_lab.attention(q, k, v, kernel="flash", pv="fast")
    with pytest.raises(TypeError, match="pv: not an option of kernel 'tiled'"):
        fa_lab.attention(q, k, v, kernel="tiled", pv="blas")
    out = fa_lab.attention(q, k, v, kernel="flash", pv="blas")  # BLAS serves every call
    np.testing.assert_allclose(out, reference.attention(q, k, v)[0], atol=2e-5)


def test_the_byte_model_counts_the_packed_tile():
    kw = dict(B=1, H=8, Nq=512, Nk=512, d=64, itemsize=4, block_q=128, block_kv=256, threads=2)
    scratch = KERNELS["flash"].scratch
    extra = sum(scratch(**kw, pv="microkernel").values()) - sum(scratch(**kw).values())
    assert extra == 2 * 256 * 64 * 4  # one Bc x d tile per running task


def _planted(fast):
    cands = [{"label": f"flash, P V by {p}", "median_s": 1e-3 if p == fast else 2e-3,
              "q25_s": 1e-3, "q75_s": 2e-3, "kernel": "flash", "pv": p}
             for p in config.FLASH_PV_PATHS]
    return {"fingerprint": tune.fingerprint(), "choices": {},
            "paths": {"flash_pv": {"shape": "B1H8/8-q2048k2048-d64-False", "candidates": cands}}}


def _spy(monkeypatch):
    seen, kern = [], KERNELS["flash"]

    def run(*args, **kwargs):
        seen.append(kwargs.get("pv"))
        return kern.run(*args, **kwargs)
    monkeypatch.setitem(KERNELS, "flash", dataclasses.replace(kern, run=run))
    return seen


@pytest.mark.parametrize("fast", config.FLASH_PV_PATHS)
def test_auto_runs_the_path_measured_faster_here(tune_file, monkeypatch, fast):
    import json

    tune_file.write_text(json.dumps(_planted(fast)))
    seen = _spy(monkeypatch)
    q, k, v = Case(H=2, Nq=40, d=32).inputs(np.float32)
    p = fa_lab.plan(q, k, v)
    assert p["pv"] == fast and "measured on this machine" in p["pv_from"]
    np.testing.assert_allclose(fa_lab.attention(q, k, v), reference.attention(q, k, v)[0],
                               atol=2e-5)
    assert seen == [fast]
    fa_lab.attention(q, k, v, kernel="flash")  # a named kernel keeps its default
    fa_lab.attention(q, k, v, pv="blas")      # a given path wins
    assert seen[1:] == ["blas", "blas"]
    assert fa_lab.plan(q, k, v, kernel="flash")["pv"] == "blas"


def test_auto_keeps_blas_where_the_measurement_does_not_apply(tune_file):
    import json

    tune_file.write_text(json.dumps(_planted("microkernel")))
    q, k, v = Case(Nq=40, d=80).inputs(np.float32)  # d not a multiple of 32
    assert fa_lab.plan(q, k, v)["pv"] == "blas"
    q, k, v = Case(Nq=40, d=32).inputs(np.float64)  # float64
    assert fa_lab.plan(q, k, v)["pv"] == "blas"
    q, k, v = Case(Nq=1, Nk=500, d=32).inputs(np.float32)  # a decode step
    assert fa_lab.plan(q, k, v, causal="bottom_right")["pv"] == "blas"
    tune_file.write_text(json.dumps({**_planted("microkernel"), "fingerprint": {"cpu": "x"}}))
    q, k, v = Case(Nq=40, d=32).inputs(np.float32)  # another machine's file
    p = fa_lab.plan(q, k, v)
    assert p["pv"] == "blas" and p["pv_from"].startswith("the default")


def test_a_candidate_with_an_unknown_path_makes_the_file_invalid(tune_file):
    import json
    import warnings

    bad = _planted("blas")
    bad["paths"]["flash_pv"]["candidates"][0]["pv"] = "gpu"
    tune_file.write_text(json.dumps(bad))
    q, k, v = Case(Nq=40, d=32).inputs(np.float32)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert fa_lab.plan(q, k, v)["pv"] == "blas"
    assert any("flash_pv" in str(x.message) and "'gpu'" in str(x.message) for x in w)


def test_tune_paths_measures_both_paths_and_auto_follows(tune_file):
    """Quick shape, two rounds: each path validated, stored, and the faster one is what
    ``plan()`` then names for a prefill call (which one wins is the machine's business)."""
    from fa_lab.settings import tuning_file

    df = tune.tune_paths(["flash_pv"], quick=True, repeats=2)
    assert sorted(df["pv"]) == sorted(config.FLASH_PV_PATHS) and df["chosen"].sum() == 1
    stored = tuning_file.load()["paths"]["flash_pv"]
    assert {c["pv"] for c in stored["candidates"]} == set(config.FLASH_PV_PATHS)
    q, k, v = Case(Nq=64, d=64).inputs(np.float32)
    assert fa_lab.plan(q, k, v)["pv"] == df[df["chosen"]]["pv"].iloc[0]
