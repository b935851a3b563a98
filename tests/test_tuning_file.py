"""The tuning file is validated: a malformed one gives one warning and the defaults,
never a wrong result, a SystemError or an AttributeError (attention, plan, decode,
presets)."""

import json
import warnings

import numpy as np
import pytest

import fa_lab
from fa_lab.tools import presets, tune
from fa_lab.numerics import reference
from fa_lab.settings.config import FLASH_BLOCKS


def _good(block_q=32, block_kv=48):
    entry = {"block_q": block_q, "block_kv": block_kv, "median_s": 0.01, "shape": "x"}
    return {"fingerprint": tune.fingerprint(), "choices": {"flash": {
        r.name: dict(entry) for r in tune.REGIMES}},
        "sweeps": {"flash": {"long": [dict(entry)]}}}


def _bad_files():
    fp = tune.fingerprint()
    bad_blocks = [-8, 0, 2.5, "64", True, None, 10**9]
    files = {f"block_q={b!r}": {"fingerprint": fp, "choices": {"flash": {
        r.name: {"block_q": b, "block_kv": 64} for r in tune.REGIMES}}} for b in bad_blocks}
    files.update({f"block_kv={b!r}": {"fingerprint": fp, "choices": {"flash": {
        r.name: {"block_q": 64, "block_kv": b} for r in tune.REGIMES}}} for b in bad_blocks})
    files.update({
        "a JSON list": [1, 2, 3],
        "a JSON string": "tuned",
        "null": None,
        "choices a list": {"fingerprint": fp, "choices": [1]},
        "kernel entry a list": {"fingerprint": fp, "choices": {"flash": [64, 64]}},
        "regime entry a number": {"fingerprint": fp, "choices": {"flash": {"long": 64}}},
        "fingerprint a string": {"fingerprint": "me", "choices": {}},
        "sweeps not a list": {"fingerprint": fp, "choices": {}, "sweeps": {"flash": {
            "long": {"block_q": 1}}}},
        "sweep median NaN": {"fingerprint": fp, "choices": {}, "sweeps": {"flash": {
            "long": [{"block_q": 64, "block_kv": 64, "median_s": float("nan")}]}}},
    })
    return files


BAD = _bad_files()


@pytest.mark.parametrize("name", list(BAD))
def test_bad_tuning_file_gives_one_warning_and_the_defaults(tune_file, name):
    tune_file.write_text(json.dumps(BAD[name]))
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, n, 8)).astype(np.float32) for n in (300, 300, 300))
    with pytest.warns(tune.TuningFileWarning) as record:
        out = fa_lab.attention(q, k, v)
        p = fa_lab.plan(q, k, v)
        table = presets.table()
        cache = fa_lab.KVCache(1, 2, 300, 8)
        cache.append(k, v)
        dec = fa_lab.decode(q[:, :, :1], cache)
    assert sum(issubclass(w.category, tune.TuningFileWarning) for w in record) == 1
    assert "ignoring the tuning file" in str(record[0].message)
    assert p["blocks_from"] == "default" and (p["block_q"], p["block_kv"]) == (256, 256)
    assert (table["source"] == "default, not tuned").all()
    expected, _ = reference.attention(q, k, v)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dec, reference.attention(q[:, :, :1], k, v,
                                                        causal="bottom_right")[0],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("text", ["{not json", "", "\x00\xff", '{"a": 1e999999}'])
def test_unparseable_tuning_file(tune_file, text):
    tune_file.write_bytes(text.encode("latin-1"))
    q = np.ones((1, 1, 4, 4), np.float32)
    with pytest.warns(tune.TuningFileWarning):
        assert fa_lab.plan(q, q, q)["blocks_from"] == "default"


def test_valid_tuning_file_is_used_without_warning(tune_file):
    tune_file.write_text(json.dumps(_good()))
    q = np.ones((1, 1, 300, 4), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tune.TuningFileWarning)
        p = fa_lab.plan(q, q, q)
    assert (p["block_q"], p["block_kv"], p["blocks_from"]) == (32, 48, "tuned")
    assert tune.validate(_good()) is None


def test_validate_names_the_problem():
    bad = _good()
    bad["choices"]["flash"]["long"]["block_q"] = -8
    assert "choices.flash.long.block_q" in tune.validate(bad)
    assert "JSON object" in tune.validate([1])
    assert tune.MAX_BLOCK >= max(FLASH_BLOCKS)


def test_fingerprint_does_not_depend_on_blas_load_order(monkeypatch):
    """A stored choice must apply whichever BLAS (NumPy's or SciPy's) loaded first."""
    from fa_lab.settings import blas as _blas

    libs = [{"user_api": "blas", "filepath": "/x/scipy/libscipy_openblas.so",
             "architecture": "SkylakeX", "version": "0.3.30", "num_threads": 1},
            {"user_api": "blas", "filepath": "/x/numpy/libscipy_openblas64_.so",
             "architecture": "SkylakeX", "version": "0.3.31", "num_threads": 2}]
    import threadpoolctl

    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: libs)
    first = _blas.blas_libraries()
    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: libs[::-1])
    assert _blas.blas_libraries() == first and first[0]["owner"] == "NumPy"
