"""The checker itself must be able to fail (a tolerance that accepts anything is a defect)."""

import numpy as np
import pytest

from fa_lab.numerics import reference
from fa_lab.numerics.testing import Case, ToleranceError, assert_close


def _outputs(dtype=np.float32):
    q, k, v = Case(B=1, H=2, Nq=40, Nk=50, d=16).inputs(dtype, seed=1)
    exp, _ = reference.attention(q, k, v)
    base, _ = reference.attention(q, k, v, dtype=np.float32)
    return exp, base


def test_baseline_passes_its_own_rule():
    exp, base = _outputs()
    info = assert_close(base, exp, baseline=base)
    assert 0 < info["max_error"] <= info["allowed"]


@pytest.mark.parametrize("ulps", [30, 1000])
def test_fails_on_a_perturbed_float32_output_and_names_the_element(ulps):
    exp, base = _outputs()
    bad = base.copy()
    bad[0, 1, 7, 3] += ulps * np.finfo(np.float32).eps * max(1.0, abs(bad[0, 1, 7, 3]))
    with pytest.raises(ToleranceError, match=r"index \(0, 1, 7, 3\)"):
        assert_close(bad, exp, baseline=base)


def test_fails_on_a_perturbed_float64_output():
    exp, _ = _outputs()
    bad = exp.copy()
    bad[0, 0, 0, 0] += 1e-10
    with pytest.raises(ToleranceError, match=r"index \(0, 0, 0, 0\)"):
        assert_close(bad, exp)
    assert_close(exp + 1e-14, exp)


def test_allowance_is_tight_relative_to_the_output():
    # The allowance must be of the order of float32 rounding, not of the output itself.
    exp, base = _outputs()
    allowed = assert_close(base, exp, baseline=base)["allowed"]
    assert allowed < 1e-5 * np.abs(exp).max()


@pytest.mark.parametrize("share, ok", [(0.98, True), (1.02, False)])
def test_the_reported_allowance_is_the_one_enforced(share, ok):
    # An error just under the allowance passes and just over it fails (the actual is
    # float64 here, so the perturbation is not rounded away; the float32 rule applies).
    exp, base = _outputs()
    allowed = assert_close(base, exp, baseline=base)["allowed"]
    idx = np.unravel_index(np.argmax(np.abs(base - exp)), exp.shape)
    bad = base.astype(np.float64)
    bad[idx] = exp[idx] + share * allowed
    if ok:
        assert_close(bad, exp, baseline=base, rule="float32")
    else:
        with pytest.raises(ToleranceError):
            assert_close(bad, exp, baseline=base, rule="float32")


@pytest.mark.parametrize("special", [np.nan, np.inf, -np.inf])
def test_special_values_must_match_in_place(special):
    exp = np.zeros((3, 4))
    act = np.zeros((3, 4), np.float32)
    act[1, 2] = special
    with pytest.raises(ToleranceError, match=r"index \(1, 2\)"):
        assert_close(act, exp, baseline=np.zeros_like(act))
    exp[1, 2] = special
    assert_close(act, exp, baseline=act)


def test_shape_mismatch_fails():
    with pytest.raises(ToleranceError, match="shape"):
        assert_close(np.zeros(3), np.zeros(4))


def test_float32_rule_requires_a_baseline():
    with pytest.raises(ValueError, match="baseline"):
        assert_close(np.zeros(3, np.float32), np.zeros(3))


def test_lse_floor_uses_the_magnitude_of_its_terms():
    from fa_lab.numerics.testing import lse_magnitude

    lse = np.array([-1.5, 2.0, -np.inf])
    q, k = np.ones((3, 4)), np.full((64, 4), 2.0)  # |q_i| = 2, |k_j| = 4, scale 1/2
    assert lse_magnitude(lse, q, k) == pytest.approx(2.0 + np.log(64) + 0.5 * 2 * 4)
    exp = np.array([-1.6756211493575246])
    off = np.float32(-1.6756203)  # 7 ulps away, within rounding at magnitude ~12
    base = np.float32(exp[0])
    with pytest.raises(ToleranceError):
        assert_close(np.array([off]), exp, baseline=np.array([base]))
    mag = lse_magnitude(exp, q, k)
    assert_close(np.array([off]), exp, baseline=np.array([base]), magnitude=mag)
    with pytest.raises(ToleranceError):  # but 100x that is still caught
        assert_close(np.array([np.float32(exp[0] + 1e-4)]), exp, baseline=np.array([base]),
                     magnitude=mag)
