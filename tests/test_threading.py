"""Fork and thread safety: the threading layer, fork after a parallel call, nogil kernels.

A forked child must survive a parallel kernel call made by its parent (GNU OpenMP kills
it, see fa_lab.settings.config.THREADING_LAYER), and Python threads calling the kernels at the
same time must get bitwise the single-threaded results. Every wait has a timeout, so a
hang fails the test instead of hanging CI.
"""

import multiprocessing as mp
import os
import subprocess
import sys
import threading

import numba
import numpy as np
import pytest

import fa_lab
from fa_lab.numerics.testing import Case

TIMEOUT_S = 120  # generous: the child may compile nothing (fork shares the parent's code)


def _inputs(seed=0, N=37, dtype=np.float32):
    return Case(B=1, H=2, Nq=N, Nk=N + 4, d=8).inputs(dtype, seed=seed)


def _child_attention(q, k, v, expected):
    """Run in the forked child: exit 0 only if the parent's result is reproduced."""
    out = fa_lab.attention(q, k, v, causal=True)
    os._exit(0 if np.array_equal(out, expected) else 3)


def test_threading_layer_is_fork_and_thread_safe():
    if os.environ.get("NUMBA_THREADING_LAYER"):
        pytest.skip("NUMBA_THREADING_LAYER set by the environment")
    assert numba.threading_layer() == fa_lab.settings.config.THREADING_LAYER == "tbb"
    assert fa_lab.settings.config.THREADING_LAYER_IN_USE == "tbb"


def test_fork_process_after_a_parallel_call_gives_the_right_result():
    q, k, v = _inputs()
    expected = fa_lab.attention(q, k, v, causal=True)  # parallel kernel ran in the parent
    assert fa_lab.plan(q, k, v, causal=True)["kernel"] == "flash"
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_child_attention, args=(q, k, v, expected))
    p.start()
    p.join(TIMEOUT_S)
    if p.is_alive():
        p.kill()
        pytest.fail(f"forked child still running after {TIMEOUT_S} s (hang)")
    assert p.exitcode == 0, f"forked child exit code {p.exitcode} (-15/-9: killed; 3: wrong)"


POOL_SCRIPT = """
import multiprocessing as mp, sys
import numpy as np
import fa_lab
from fa_lab.numerics.testing import Case
kernel = sys.argv[1]

def work(seed):
    q, k, v = Case(B=1, H=2, Nq=37, Nk=41, d=8).inputs(np.float32, seed=seed)
    return fa_lab.attention(q, k, v, kernel=kernel, causal=True)

if __name__ == "__main__":
    q, k, v = Case(B=1, H=2, Nq=37, Nk=41, d=8).inputs(np.float32)
    fa_lab.attention(q, k, v, kernel=kernel)  # start the parent's thread pool
    seeds = [1, 2, 3, 4]
    pool = mp.get_context("fork").Pool(2)
    results = pool.map_async(work, seeds).get(timeout=%d)
    pool.terminate()
    for seed, got in zip(seeds, results):
        np.testing.assert_array_equal(got, work(seed))
    print("ok")
"""


@pytest.mark.parametrize("kernel", ["tiled_simd", "flash"])
def test_fork_pool_map_after_a_parallel_call(kernel, tmp_path):
    # in its own interpreter, under a timeout: a hang fails the test, never CI itself
    script = tmp_path / "pool.py"
    script.write_text(POOL_SCRIPT % TIMEOUT_S)
    try:
        run = subprocess.run([sys.executable, str(script), kernel], capture_output=True,
                             text=True, timeout=2 * TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fork + Pool.map still running after {2 * TIMEOUT_S} s (hang)")
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


@pytest.mark.parametrize("kernel", ["naive", "tiled_simd", "flash"])
def test_concurrent_threads_give_bitwise_single_thread_results(kernel):
    cases = [_inputs(seed, N=N, dtype=dt) for seed, N, dt in
             ((0, 64, np.float32), (1, 33, np.float64), (2, 130, np.float32),
              (3, 1, np.float32))]
    expected = [fa_lab.attention(*c, kernel=kernel, causal=True, return_lse=True)
                for c in cases]
    errors, results = [], {}

    def work(t):
        try:
            for rep in range(3):
                for i, c in enumerate(cases):
                    results[t, rep, i] = fa_lab.attention(*c, kernel=kernel, causal=True,
                                                          return_lse=True)
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    _run_threads(work, [(t,) for t in range(4)], errors)
    assert len(results) == 4 * 3 * len(cases)
    for (t, rep, i), (out, lse) in results.items():
        np.testing.assert_array_equal(out, expected[i][0])
        np.testing.assert_array_equal(lse, expected[i][1])


def test_concurrent_threads_decode_int8_backward_topk():
    q, k, v = _inputs(5, N=40)
    out, lse = fa_lab.attention(q, k, v, return_lse=True)
    cache = fa_lab.KVCache(1, 2, 64, 8)
    cache.append(k, v)
    calls = {
        "decode": lambda: fa_lab.decode(q[:, :, :3], cache),
        "int8": lambda: fa_lab.attention_int8(q, k, v, causal=True),
        "backward": lambda: fa_lab.attention_backward(q, k, v, out, lse, out)[0],
        "topk": lambda: fa_lab.topk_attention(q[0, 0], k[0, 0], k=4)[0],
    }
    expected = {n: f() for n, f in calls.items()}
    errors = []

    def work():
        try:
            for _ in range(3):
                for n, f in calls.items():
                    np.testing.assert_array_equal(f(), expected[n], err_msg=n)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    _run_threads(work, [()] * 3, errors)


def test_every_jitted_driver_releases_the_gil():
    from fa_lab.kernels.ladder.flash import flash_splitkv_forward, tile_gemms
    from fa_lab.features.retrieval import _merge_topk

    drivers = [k.driver for table in (fa_lab.KERNELS, fa_lab.BACKWARD_KERNELS,
                                      fa_lab.INT8_KERNELS) for k in table.values() if k.driver]
    drivers += [flash_splitkv_forward, tile_gemms, _merge_topk]
    assert len(drivers) >= 10
    for d in drivers:
        assert d.targetoptions.get("nogil") is True, d.py_func.__name__


def _run_threads(work, args_list, errors):
    """Start one thread per args tuple, wait (bounded), and fail on a hang or an error."""
    threads = [threading.Thread(target=work, args=args) for args in args_list]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
