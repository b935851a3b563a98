"""Paths chosen by measurement: ``kernel="auto"`` runs the candidate the tuning file
measured fastest on this machine (decode kernel and key splits; the INT8 kernel and
``P V`` precision that ``pv_dtype="bfloat16"`` allows), the plans say which and why,
a file from another machine or a malformed one changes nothing, and the results stay
those of the float64 reference. The times are planted here: no test times anything."""

import json
import warnings

import numpy as np
import pytest

import fa_lab
from fa_lab.features.int8 import plan_int8
from fa_lab.features.kvcache import plan_kvcache
from fa_lab.numerics import reference
from fa_lab.numerics.testing import Case
from fa_lab.registry import INT8_KERNELS, KVCACHE_KERNELS
from fa_lab.settings import tuning_file
from fa_lab.tools import tune


def _cand(label, ms, **opts):
    t = ms / 1e3
    return {"label": label, "median_s": t, "q25_s": 0.9 * t, "q75_s": 1.1 * t, **opts}


def _planted(fingerprint=None, attention_splits=3, gqa_kernel="quantized", int8=None):
    """A tuning file whose decode entries pick ``attention_splits`` for flash, flash
    (MHA) and ``gqa_kernel`` (GQA) for the cache, and ``int8`` for INT8 if given."""
    decode = {}
    for name, kv_best in (("decode_mha", "flash"), ("decode_gqa", gqa_kernel)):
        cands = [_cand(f"attention flash, {s}", 1.0 if s == attention_splits else 2.0,
                       api="attention", kernel="flash", splits=s) for s in (1, 2, 3, 4)]
        for kern in ("flash", "quantized"):
            cands.append(_cand(f"kvcache {kern}, 2", 0.5 if kern == kv_best else 0.9,
                               api="kvcache", kernel=kern, splits=2))
        decode[name] = {"shape": f"{name} shape", "candidates": cands}
    if int8:
        decode["int8_pv"] = {"shape": "int8 shape", "candidates": [
            _cand(f"{k}, {pv}", ms, kernel=k, pv_dtype=pv) for k, pv, ms in int8]}
    return {"fingerprint": fingerprint or tune.fingerprint(), "choices": {},
            "paths": decode}


def _decode_inputs(H, H_kv, Nk=300, B=1):
    return Case(B=B, H=H, H_kv=H_kv, Nq=1, Nk=Nk, d=16).inputs(np.float32, seed=3)


def _spy(monkeypatch, table, name):
    """Record the ``splits`` each run of ``table[name]`` gets (then run it)."""
    import dataclasses

    seen, kern = [], table[name]

    def run(*args, **kwargs):
        seen.append(kwargs.get("splits"))
        return kern.run(*args, **kwargs)
    monkeypatch.setitem(table, name, dataclasses.replace(kern, run=run))
    return seen


@pytest.mark.parametrize("H,H_kv", [(8, 8), (32, 8)])
def test_attention_decode_runs_the_measured_splits(tune_file, H, H_kv, monkeypatch):
    tune_file.write_text(json.dumps(_planted(attention_splits=3)))
    q, k, v = _decode_inputs(H, H_kv, Nk=1000)  # 4 key blocks of 256: room for 3 splits
    p = fa_lab.plan(q, k, v, causal="bottom_right")
    assert p["splits"] == 3 and "measured on this machine" in p["splits_from"]
    ran = _spy(monkeypatch, fa_lab.KERNELS, "flash")
    fa_lab.attention(q, k, v, causal="bottom_right")
    assert ran == [3]  # what really ran, not only what the plan says
    assert "attention flash, 3 1 ms" in p["splits_from"]  # the chosen one's median
    assert "next attention flash" in p["splits_from"]     # and the runner-up's
    # a named kernel keeps its rule; given splits win
    assert fa_lab.plan(q, k, v, causal="bottom_right", kernel="flash")["splits_from"].startswith("the rule")
    out = fa_lab.attention(q, k, v, causal="bottom_right")
    expected, _ = reference.attention(q, k, v, causal="bottom_right")
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-4)


def test_measured_splits_apply_only_to_calls_like_the_measured_shape(tune_file):
    tune_file.write_text(json.dumps(_planted(attention_splits=3)))
    q, k, v = _decode_inputs(1, 1)  # 1 head: not like the 8 it was measured on
    assert fa_lab.plan(q, k, v, causal="bottom_right")["splits_from"].startswith("the rule")
    q, k, v = Case(B=1, H=8, Nq=64, Nk=300, d=16).inputs(np.float32)  # not decoding
    assert fa_lab.plan(q, k, v)["splits_from"].startswith("the rule")
    q, k, v = Case(B=1, H=8, Nq=16, Nk=300, d=16).inputs(np.float32)  # 16 rows, not one
    assert fa_lab.plan(q, k, v, causal="bottom_right")["splits_from"].startswith("the rule")
    assert plan_kvcache(q, k, v)["why"] == "the fastest kernel that serves the call"
    q, k, v = _decode_inputs(8, 8, Nk=5)  # 5 keys: one key block, so at most one split
    p = fa_lab.plan(q, k, v, causal="bottom_right")
    assert p["splits"] == 1 and "measured" in p["splits_from"]


def test_a_file_from_another_machine_changes_nothing(tune_file):
    other = dict(tune.fingerprint(), cpu="another CPU")
    tune_file.write_text(json.dumps(_planted(fingerprint=other)))
    q, k, v = _decode_inputs(32, 8)
    assert fa_lab.plan(q, k, v, causal="bottom_right")["splits_from"].startswith("the rule")
    assert plan_kvcache(q, k, v)["kernel"] == "flash"


@pytest.mark.parametrize("H,H_kv,kernel", [(8, 8, "flash"), (32, 8, "quantized"),
                                            (128, 8, "quantized")])
def test_cache_decode_runs_the_measured_kernel(tune_file, H, H_kv, kernel, monkeypatch):
    tune_file.write_text(json.dumps(_planted(gqa_kernel="quantized")))
    q, k, v = _decode_inputs(H, H_kv)
    p = plan_kvcache(q, k, v)
    assert p["kernel"] == kernel and "measured on this machine" in p["why"]
    # the splits only where the heads are within 2x of the measured shape's (8 or 32)
    assert p["splits"] == (2 if H <= 32 else None)
    ran = _spy(monkeypatch, KVCACHE_KERNELS, kernel)
    out = fa_lab.attention_with_kvcache(q, k, v, cache_seqlens=300)
    assert ran == [p["splits"]]  # the measured kernel really ran, with the planned splits
    expected, _ = reference.attention(q, k, v, causal="bottom_right")
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-4)


def test_cache_decode_falls_back_when_the_measured_kernel_cannot_serve(tune_file):
    tune_file.write_text(json.dumps(_planted(gqa_kernel="quantized")))
    q, k, v = _decode_inputs(32, 8)
    p = plan_kvcache(q, k, v, softcap=5.0)  # quantized has no softcap: the next measured
    assert p["kernel"] == "flash" and "kvcache flash, 2 0.9 ms" in p["why"]
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))  # quantized: float32 only
    assert plan_kvcache(q64, k64, v64)["kernel"] == "flash"
    assert plan_kvcache(q, k, v, kernel="flash")["why"] == "given"


@pytest.mark.skipif(INT8_KERNELS["sage"].available() is not None,
                    reason="kernel 'sage' needs AVX-512 on this CPU")
def test_int8_auto_runs_the_measured_pv_precision(tune_file):
    tune_file.write_text(json.dumps(_planted(int8=[("sage", "bfloat16", 2.0),
                                                   ("sage", "float32", 1.0)])))
    q, k, v = Case(B=1, H=2, Nq=80, Nk=90, d=32).inputs(np.float32, seed=1)
    p = plan_int8(q, k, v, pv_dtype="bfloat16")
    assert (p["kernel"], p["pv_dtype"], p["pv_path"]) == ("sage", "float32", "fp32")
    assert "sage, float32 1 ms" in p["why"] and "next sage, bfloat16 2 ms" in p["why"]
    auto = fa_lab.attention_int8(q, k, v, pv_dtype="bfloat16")
    fp32 = fa_lab.attention_int8(q, k, v, kernel="sage", pv_dtype="float32")
    np.testing.assert_array_equal(auto, fp32)
    # float32 asked: never a bf16 path; a named kernel keeps the asked precision
    assert plan_int8(q, k, v)["pv_dtype"] == "float32"
    assert plan_int8(q, k, v, kernel="sage", pv_dtype="bfloat16")["pv_dtype"] == "bfloat16"


_DEC = dict(api="attention", kernel="flash", splits=2)
BAD_PATHS = {
    "paths a list": [1],
    "candidates empty": {"decode_mha": {"candidates": []}},
    "candidate without label": {"decode_mha": {"candidates": [{"median_s": 1.0}]}},
    "median NaN": {"decode_mha": {"candidates": [_cand("x", float("nan"), **_DEC)]}},
    "median negative": {"decode_mha": {"candidates": [_cand("x", -1.0, **_DEC)]}},
    "splits zero": {"decode_mha": {"candidates": [_cand("x", 1.0, **{**_DEC, "splits": 0})]}},
    "splits a string": {"decode_mha": {"candidates": [_cand("x", 1.0, **{**_DEC, "splits": "4"})]}},
    "splits missing": {"decode_mha": {"candidates": [_cand("x", 1.0, api="attention", kernel="flash")]}},
    "kernel missing": {"decode_gqa": {"candidates": [_cand("x", 1.0, api="kvcache", splits=1)]}},
    "kernel a list": {"decode_gqa": {"candidates": [_cand("x", 1.0, **{**_DEC, "kernel": ["flash"]})]}},
    "api unknown": {"decode_mha": {"candidates": [_cand("x", 1.0, **{**_DEC, "api": "decode"})]}},
    "pv_dtype missing": {"int8_pv": {"candidates": [_cand("x", 1.0, kernel="sage")]}},
    "pv_dtype float16": {"int8_pv": {"candidates": [_cand("x", 1.0, kernel="sage", pv_dtype="float16")]}},
    "bf16 kernel missing": {"decode_bf16": {"candidates": [_cand("x", 1.0)]}},
}


@pytest.mark.parametrize("name", list(BAD_PATHS))
def test_bad_paths_give_one_warning_and_the_rule(tune_file, name):
    tune_file.write_text(json.dumps({"fingerprint": tune.fingerprint(), "choices": {},
                                     "paths": BAD_PATHS[name]}))
    q, k, v = _decode_inputs(8, 8)
    with pytest.warns(tune.TuningFileWarning, match="paths"):
        p = fa_lab.plan(q, k, v, causal="bottom_right")
    assert p["splits_from"].startswith("the rule")
    assert plan_kvcache(*_decode_inputs(32, 8))["kernel"] == "flash"  # no crash: the rule
    x = np.zeros(4, np.float16)  # and a half-precision call names its bad argument
    with pytest.raises(ValueError, match="q"):
        fa_lab.attention(x, x, x)


def test_tune_paths_measures_validates_and_stores(tune_file):
    """Quick shapes, few rounds: every candidate is run and checked, stored with its
    quartiles, and the fastest per API is what ``auto`` then runs."""
    df = tune.tune_paths(["decode_gqa"], quick=True, repeats=2)
    assert set(df["api"]) == {"attention", "kvcache"}
    assert (df["q25_s"] <= df["median_s"]).all() and (df["median_s"] <= df["q75_s"]).all()
    assert df.groupby("api")["chosen"].sum().eq(1).all()
    stored = tuning_file.load()
    assert [c["label"] for c in stored["paths"]["decode_gqa"]["candidates"]] == list(df["label"])
    best = df[df["chosen"] & (df["api"] == "kvcache")].iloc[0]
    q, k, v = _decode_inputs(32, 8)
    assert plan_kvcache(q, k, v)["kernel"] == best["kernel"]
    # block tuning afterwards keeps the measured paths
    tune.autotune("flash", ["decode"], quick=True, repeats=1)
    assert "decode_gqa" in tuning_file.load()["paths"]
    with pytest.raises(ValueError, match="names"):
        tune.tune_paths(["nope"])


@pytest.mark.parametrize("fastest", ["amx", "float32"])
def test_bf16_decode_runs_the_measured_path(tune_file, fastest):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from fa_lab.settings import cpu_features

    if fastest == "amx" and cpu_features.amx_unavailable():
        pytest.skip(f"AMX kernels skipped: {cpu_features.amx_unavailable()}")
    planted = _planted()
    planted["paths"]["decode_bf16"] = {"shape": "bf16 shape", "candidates": [
        _cand("amx", 1.0 if fastest == "amx" else 2.0, kernel="amx"),
        _cand("float32", 1.0 if fastest == "float32" else 2.0, kernel="float32")]}
    tune_file.write_text(json.dumps(planted))
    q, k, v = (x.astype(ml_dtypes.bfloat16) for x in _decode_inputs(8, 8, Nk=200))
    auto = fa_lab.attention(q, k, v, causal="bottom_right")
    named = fa_lab.attention(q, k, v, causal="bottom_right",
                             kernel="amx" if fastest == "amx" else "flash")
    np.testing.assert_array_equal(auto.view(np.uint16), named.view(np.uint16))
    # prefill is not decoding: the measured decode choice does not apply there
    qp = np.repeat(q, 40, axis=2)
    if fastest == "float32" and not cpu_features.amx_unavailable():
        wide = fa_lab.attention(qp, k, v, kernel="flash")
        assert not np.array_equal(fa_lab.attention(qp, k, v).view(np.uint16), wide.view(np.uint16))


def test_tune_paths_bf16_decode(tune_file):
    pytest.importorskip("ml_dtypes")
    from fa_lab.settings import cpu_features

    if cpu_features.amx_unavailable():
        pytest.skip(f"no bf16 kernel to compare: {cpu_features.amx_unavailable()}")
    df = tune.tune_paths(["decode_bf16"], quick=True, repeats=2)
    assert set(df["kernel"]) == {"amx", "float32"} and df["chosen"].sum() == 1


def test_a_measured_candidate_that_cannot_serve_gives_way_to_the_next(tune_file):
    """The fastest candidate that serves the call: a bf16-only kernel paired with fp32
    P V, or a kernel this CPU lacks, is passed over for the next measured one."""
    from fa_lab.settings import cpu_features

    if INT8_KERNELS["sage"].available() is not None:
        pytest.skip("kernel 'sage' needs AVX-512 on this CPU")
    tune_file.write_text(json.dumps(_planted(int8=[("amx", "float32", 0.5), ("amx", "bfloat16", 1.0),
                                                   ("sage", "float32", 2.0)])))
    q, k, v = Case(B=1, H=2, Nq=80, Nk=90, d=32).inputs(np.float32, seed=1)
    with cpu_features.forced(amx=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = plan_int8(q, k, v, pv_dtype="bfloat16")
    assert (p["kernel"], p["pv_dtype"]) == ("sage", "float32") and "measured" in p["why"]
    if cpu_features.amx_unavailable() is None:
        p = plan_int8(q, k, v, pv_dtype="bfloat16")
        assert (p["kernel"], p["pv_dtype"]) == ("amx", "bfloat16")


def test_public_bf16_bits_entry_refuses_other_dtypes():
    x = np.zeros((1, 2, 4, 32), np.float16)
    with pytest.raises(TypeError, match="q must be bfloat16"):
        fa_lab.api.attention_bf16_bits(x, x, x)
    y = np.zeros((1, 2, 4, 32), np.float32)
    with pytest.raises(TypeError, match="k must be bfloat16"):
        fa_lab.api.attention_bf16_bits(y.view(np.uint16)[..., :32], y, y)


def test_torch_bf16_follows_the_measured_decode_path(tune_file):
    torch = pytest.importorskip("torch")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from fa_lab.integrations import torch as fa_torch

    planted = _planted()
    planted["paths"]["decode_bf16"] = {"shape": "s", "candidates": [
        _cand("amx", 2.0, kernel="amx"), _cand("float32", 1.0, kernel="float32")]}
    tune_file.write_text(json.dumps(planted))
    q, k, v = _decode_inputs(8, 8, Nk=200)
    t = [torch.from_numpy(x).to(torch.bfloat16) for x in (q, k, v)]
    out = fa_torch.attention(*t, causal="bottom_right")
    b = [x.float().numpy().astype(ml_dtypes.bfloat16) for x in t]
    mine = fa_lab.attention(*b, causal="bottom_right")
    np.testing.assert_array_equal(out.view(torch.int16).numpy(), mine.view(np.int16))
