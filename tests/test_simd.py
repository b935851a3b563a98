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


# ---------------------------------------------------------------- full vector width

WIDTH_PROBE = r"""
import json, sys
import numpy as np
import fa_lab
from fa_lab.lessons import simd
from fa_lab.settings.machine import codegen

from fa_lab.kernels.ladder import flash

q = np.ones((1, 1, 8, 16), np.float32)
targets = {}
for name in ("tiled_simd", "flash"):
    fa_lab.attention(q, q, q, kernel=name)
    targets[name] = fa_lab.KERNELS[name].driver
S, r = np.ones((8, 64), np.float32), np.zeros(8, np.float32)
flash._softmax_block_f32(S, np.full(8, -np.inf, np.float32), r.copy(), r.copy(), S.copy())
targets["flash softmax"] = flash._softmax_block_f32  # flash's loops that LLVM vectorizes
widths = {}
for name, fn in targets.items():
    fmas = simd.PACKED_FMA.findall(simd.assembly(fn))  # the vectorized loops' arithmetic
    widths[name] = {r: sum(r in f for f in fmas) for r in ("zmm", "ymm")}
print(json.dumps({"codegen": codegen(), "widths": widths}))
"""


def _widths(env):
    import json
    import os
    import subprocess
    import sys

    full = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU")}
    done = subprocess.run([sys.executable, "-c", WIDTH_PROBE], env={**full, **env},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _host_has_avx512():
    import llvmlite.binding as llvm

    return "+avx512f" in llvm.get_host_cpu_features().flatten().split(",")


@pytest.mark.skipif(not _host_has_avx512(), reason="the host has no AVX-512")
def test_kernels_use_512_bit_vectors_under_a_256_bit_preferring_cpu_name():
    # LLVM names an Intel Xeon VM "rocketlake", a client part tuned for 256-bit vectors;
    # the same name on any AVX-512 host reproduces its code generation. fa_lab removes
    # the preference (settings.config.VECTOR_WIDTH); with it kept, the loops use ymm.
    full = _widths({"NUMBA_CPU_NAME": "rocketlake"})
    assert full["codegen"]["llvm_cpu"] == "rocketlake"
    assert full["codegen"]["vector_bits"] == 512
    for name, w in full["widths"].items():
        assert w["zmm"] > 0, (name, w)
    kept = _widths({"NUMBA_CPU_NAME": "rocketlake", "FA_LAB_VECTOR_WIDTH": "llvm"})
    assert kept["codegen"]["vector_bits"] == 256
    for name in ("tiled_simd", "flash softmax"):  # (flash's P V micro-kernel is written in
        w = kept["widths"][name]                   # explicit 512-bit vectors: zmm either way)
        assert w["zmm"] == 0 and w["ymm"] > 0, (name, w)


def test_user_cpu_features_win_over_the_full_width():
    got = _widths({"NUMBA_CPU_NAME": "generic", "NUMBA_CPU_FEATURES": "+sse2"})
    assert got["codegen"]["vector_bits"] == 128
    assert "given to numba" in got["codegen"]["vector_width"]
