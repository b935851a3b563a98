"""The SIMD rung must really be vectorized: read its assembly."""

import numpy as np
import pytest

import fa_lab
from fa_lab.lessons import simd


def _compiled(name):
    q = np.ones((1, 1, 8, 16), np.float32)
    fa_lab.attention(q, q, q, kernel=name)
    return fa_lab.KERNELS[name].driver


@pytest.mark.parametrize("name", ["tiled_simd", "flash"])
def test_vectorized_rungs_have_packed_vector_fma(name):
    # flash's block products are BLAS calls; its packed FMAs are the polynomial exp's.
    report = simd.vector_report(_compiled(name))
    assert report["packed_fma"] >= 4, report


def test_scalar_rungs_have_no_packed_fma():
    # The contrast the ladder teaches: strict IEEE dot products stay scalar.
    for name in ("naive", "online", "tiled", "fa1"):
        assert simd.vector_report(_compiled(name))["packed_fma"] == 0, name


def test_pattern_recognizes_packed_and_scalar_fma():
    asm = "\tvfmadd231ps\t%ymm1, %ymm2, %ymm3\n\tvfmadd213ss\t%xmm1, %xmm2, %xmm3\n"
    assert len(simd.PACKED_FMA.findall(asm)) == 1
    assert len(simd.SCALAR_FMA.findall(asm)) == 1
