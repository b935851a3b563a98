"""The GPU rung on numba's CUDA simulator (conftest.py enables it): checked against the
float64 reference on awkward small shapes; never chosen by ``auto``; a clear error
where neither a GPU nor the simulator is present."""

import numpy as np
import pytest

import fa_lab
from fa_lab.tools import gpu
from fa_lab import registry
from fa_lab.numerics.testing import Case
from conftest import check_against_reference

pytest.importorskip("numba.cuda", reason="numba-cuda not installed")

CASES = [
    Case(B=1, H=1, Nq=1, Nk=1, d=1),
    Case(B=1, H=2, Nq=37, Nk=37, d=8, causal=True),             # N not a multiple of 32
    Case(B=2, H=4, H_kv=2, Nq=20, Nk=33, d=5, causal="bottom_right"),  # GQA, Nq < Nk
    Case(B=1, H=2, Nq=9, Nk=4, d=4, causal="bottom_right"),     # Nq > Nk: unseen rows
    Case(B=1, H=1, Nq=33, Nk=7, d=3, causal=True),
    Case(B=1, H=3, H_kv=1, Nq=5, Nk=21, d=7),                   # MQA, not causal
]


@pytest.mark.skipif(gpu.status()["device"] is None, reason="no GPU and no simulator")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cuda_fa2_matches_the_reference(case):
    q, k, v = case.inputs(np.float32, seed=5)
    check_against_reference("cuda_fa2", q, k, v, causal=case.causal)


@pytest.mark.skipif(gpu.status()["device"] is None, reason="no GPU and no simulator")
def test_cuda_fa2_fully_masked_rows_and_float_masks():
    q, k, v = Case(B=1, H=2, Nq=8, Nk=6, d=4).inputs(np.float32)
    mask = np.ones((8, 6), bool)
    mask[[0, 5]] = False
    out, lse = fa_lab.attention(q, k, v, mask=mask, kernel="cuda_fa2", return_lse=True)
    assert np.all(out[:, :, [0, 5]] == 0) and np.all(np.isneginf(lse[:, :, [0, 5]]))
    bias = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    check_against_reference("cuda_fa2", q, k, v, mask=bias, causal=True)


def test_auto_never_picks_the_gpu_kernel():
    q, k, v = Case(Nq=16, d=8).inputs()
    assert fa_lab.plan(q, k, v)["kernel"] != "cuda_fa2"
    assert "cuda_fa2" not in fa_lab.KERNELS and registry.CUDA_KERNELS["cuda_fa2"].device == "cuda"


def test_without_gpu_or_simulator_a_clear_error(monkeypatch):
    monkeypatch.setattr(registry, "cuda_device", lambda: None)
    q = np.ones((1, 1, 4, 4), np.float32)
    with pytest.raises(NotImplementedError, match="needs an NVIDIA GPU"):
        fa_lab.attention(q, q, q, kernel="cuda_fa2")
    with pytest.raises(NotImplementedError, match="dtype=float64"):
        monkeypatch.setattr(registry, "cuda_device", lambda: "simulator")
        fa_lab.attention(q.astype(np.float64), q.astype(np.float64), q.astype(np.float64),
                         kernel="cuda_fa2")


def test_budget_arithmetic():
    b = gpu.shared_memory_budget(32, 16, 128)
    assert b["total"] == (32 + 2 * 16) * 128 * 4 == 32768
    occ = gpu.occupancy(32, b["total"], sm_shared_kib=228)
    assert occ["blocks_per_sm"] == min(228 * 1024 // 32768, 2048 // 32, 32) == 7
    assert occ["limited_by"] == "shared memory" and occ["warps_per_sm"] == 7


def test_benchmark_says_plainly_when_there_is_no_gpu(monkeypatch):
    monkeypatch.setattr(gpu, "cuda_device", lambda: None)
    df = gpu.benchmark([(1, 1, 64, 32)])
    assert not df["measured"].any() and "no NVIDIA GPU" in df["note"].iloc[0]
