"""Ring attention across processes: shard/unshard, the launcher (world 2 and 4, both
layouts, causal and not, GQA, a padding mask), and bad shards that raise on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fa_lab.distributed import causal_work, shard, unshard

torch = pytest.importorskip("torch")

from fa_lab.tools import ring  # noqa: E402  (needs torch to run its workers)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_then_unshard_is_the_identity(layout, world):
    x = np.arange(2 * 3 * 24 * 5).reshape(2, 3, 24, 5)
    parts = [shard(x, r, world, layout) for r in range(world)]
    assert all(p.shape == (2, 3, 24 // world, 5) for p in parts)
    np.testing.assert_array_equal(unshard(parts, layout), x)
    t = torch.from_numpy(x)
    back = unshard([shard(t, r, world, layout) for r in range(world)], layout)
    assert torch.equal(back, t)


def test_zigzag_shard_holds_chunks_r_and_2w_minus_1_minus_r():
    x = np.arange(8)[None, None, :, None]
    assert shard(x, 0, 2, "zigzag").ravel().tolist() == [0, 1, 6, 7]
    assert shard(x, 1, 2, "zigzag").ravel().tolist() == [2, 3, 4, 5]
    mask = np.arange(8)[None, :]
    assert shard(mask, 1, 2, "zigzag", axis=1).ravel().tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("call, match", [
    (lambda x: shard(x, 0, 5), r"x.shape\[2\]=12 must be divisible by world = 5"),
    (lambda x: shard(x, 0, 4, "zigzag"), r"divisible by 2 \* world = 8"),
    (lambda x: shard(x, 2, 2), r"rank must be in \[0, 2\)"),
    (lambda x: shard(x, 0, 0), "world must be >= 1"),
    (lambda x: shard(x, 0, 2, "ring"), "layout must be one of"),
    (lambda x: shard(x, 0, 2, axis=7), "must be an array with an axis 7"),
    (lambda x: unshard([x, x[:, :, :6]]), "parts must all have one shape"),
    (lambda x: unshard([]), "parts must hold one shard per rank"),
    (lambda x: unshard([x[:, :, :3]], "zigzag"), "must be even"),
])
def test_shard_bad_input_names_the_argument(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call(np.zeros((1, 1, 12, 2)))


def test_zigzag_balances_the_causal_work_and_contiguous_does_not():
    for world in (2, 4, 8):
        zig, con = causal_work(world, "zigzag"), causal_work(world, "contiguous")
        total = world * world / 2  # the causal half of the (world x world) block grid
        assert zig.sum() == pytest.approx(total) and con.sum() == pytest.approx(total)
        assert np.ptp(zig.sum(axis=1)) == 0  # every rank the same
        assert con.sum(axis=1)[-1] == world - 0.5 and con.sum(axis=1)[0] == 0.5


# --- through the launcher: real processes, gloo over loopback ----------------------------

LAUNCHES = [
    dict(nproc=2, N=96, H=4, H_kv=2, d=16, causal=False, layout="contiguous"),
    dict(nproc=2, N=100, H=2, d=7, causal=True, layout="zigzag", pad=9),
    dict(nproc=4, N=128, H=4, H_kv=1, d=16, causal=True, layout="zigzag"),
    dict(nproc=4, N=64, H=2, d=8, causal=True, layout="contiguous", pad=20, B=2),
]


@pytest.mark.parametrize("opts", LAUNCHES, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_ring_through_the_launcher_matches_single_process_flash(opts):
    opts = dict(opts)
    result = ring.launch(opts.pop("nproc"), timeout_s=300, repeats=1, **opts)
    assert result["check"]["ok"], result["check"]
    assert result["check"]["max_diff_vs_flash"] < 1e-5
    world = result["world"]
    steps = {(s["rank"], s["step"]) for s in result["steps"]}
    assert steps == {(r, t) for r in range(world) for t in range(world)}
    srcs = {(s["rank"], s["step"]): s["src"] for s in result["steps"]}
    assert all(srcs[r, t] == (r - t) % world for r in range(world) for t in range(world))
    assert len(result["transfer"]) == world * (world - 1)


def test_the_cli_launches_checks_and_prints_the_steps():
    run = subprocess.run([sys.executable, "-m", "fa_lab", "ring", "--nproc", "2", "--N", "64",
                          "--H", "2", "--d", "8", "--causal", "--layout", "zigzag",
                          "--repeats", "1", "--baseline"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "check: ok" in run.stdout and "exposed_wait_ms" in run.stdout
    assert "ring / single" in run.stdout


@pytest.mark.parametrize("argv, match", [
    (["--N", "63"], "must be divisible by 2"),
    (["--N", "64", "--nproc", "4", "--layout", "zigzag", "--N", "20"], "divisible by 8"),
    (["--H", "6", "--H-kv", "4"], "multiple of --H-kv"),
    (["--pad", "5000"], "--pad must be in"),
])
def test_the_cli_refuses_bad_options_before_starting(argv, match):
    run = subprocess.run([sys.executable, "-m", "fa_lab", "ring", *argv],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and match in run.stderr.replace("\n", " ")


def test_launch_refuses_unknown_options():
    with pytest.raises(TypeError, match="unknown options.*'windw'"):
        ring.launch(2, windw=3)


# --- bad shards: the same error on every rank, never a hang ------------------------------

SCENARIOS = textwrap.dedent(r"""
    import json, os, sys
    from datetime import timedelta
    import numpy as np, torch, torch.distributed as dist
    from fa_lab.distributed import ring_attention
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
    rng = np.random.default_rng(rank)
    def qkv(n, B=1, H=2, d=4):
        return [rng.standard_normal((B, H, n, d)).astype(np.float32) for _ in range(3)]
    def attempt(name, fn):
        try:
            fn()
            print(json.dumps({"case": name, "rank": rank, "ok": True}), flush=True)
        except Exception as exc:
            print(json.dumps({"case": name, "rank": rank, "error": type(exc).__name__,
                              "message": str(exc)}), flush=True)
    attempt("lengths", lambda: ring_attention(*qkv(8 if rank == 0 else 9)))
    attempt("heads", lambda: ring_attention(*qkv(8, H=2 if rank == 0 else 4)))
    attempt("local", lambda: ring_attention(*qkv(8), key_mask=np.ones((1, 8), np.float32)
                                            if rank == 0 else None))
    attempt("causal", lambda: ring_attention(*qkv(8), causal=rank == 1))
    attempt("zigzag_odd", lambda: ring_attention(*qkv(7), layout="zigzag", causal=True))
    q, k, v = qkv(8)
    t = torch.from_numpy(q)
    attempt("tensor", lambda: print(json.dumps({"case": "tensor_type", "rank": rank,
        "is_tensor": torch.is_tensor(ring_attention(t, torch.from_numpy(k), torch.from_numpy(v)))})))
    attempt("grad", lambda: ring_attention(t.clone().requires_grad_(), k, v))
    attempt("unknown_kw", lambda: ring_attention(q, k, v, windw=3))
    if rank == 0:  # the peer has left: a timeout, not a hang
        attempt("peer_gone", lambda: ring_attention(q, k, v, timeout=3))
    os._exit(0)
""")


@pytest.fixture(scope="module")
def scenario_results(tmp_path_factory):
    script = tmp_path_factory.mktemp("ring") / "scenarios.py"
    script.write_text(SCENARIOS)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(ring.free_port()),
           "WORLD_SIZE": "2", "NUMBA_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {(r["case"], r["rank"]): r for r in rows}


@pytest.mark.parametrize("case, error, match", [
    ("lengths", "ValueError", r"same N_local; got lengths that differ \(rank 0: 8.0, rank 1: 9.0\)"),
    ("heads", "ValueError", "same H;"),
    ("local", "ValueError", "rank 0: ValueError: key_mask must be a bool array"),
    ("causal", "ValueError", "same causal;"),
    ("zigzag_odd", "ValueError", "N_local=7 must be even"),
    ("grad", "ValueError", "q requires grad: ring_attention has no backward"),
    ("unknown_kw", "TypeError", "windw"),
])
def test_a_bad_shard_raises_the_same_error_on_every_rank(scenario_results, case, error, match):
    import re

    for rank in (0, 1):
        row = scenario_results[case, rank]
        assert row.get("error") == error, row
        assert re.search(match, row["message"]), row["message"]


def test_tensors_in_give_tensors_out(scenario_results):
    assert scenario_results["tensor_type", 0]["is_tensor"]
    assert scenario_results["tensor_type", 1]["is_tensor"]


def test_a_missing_peer_times_out_instead_of_hanging(scenario_results):
    row = scenario_results["peer_gone", 0]
    assert row["error"] == "TimeoutError" and "did not complete within timeout=3" in row["message"]


def test_ring_attention_needs_an_initialised_group():
    from fa_lab.distributed import ring_attention

    q = np.zeros((1, 1, 4, 2), np.float32)
    with pytest.raises(RuntimeError, match="init_process_group first"):
        ring_attention(q, q, q)


def test_the_hide_threshold_is_where_compute_time_equals_transfer_time():
    from fa_lab.tools.merging import hide_threshold

    F, bw, H, H_kv, itemsize, d = 5e10, 1.25e9, 8, 2, 4, 64
    n = hide_threshold(F, bw, H=H, H_kv=H_kv, itemsize=itemsize)
    compute = 4 * H * n * n * d / F
    transfer = 2 * H_kv * n * d * itemsize / bw
    assert compute == pytest.approx(transfer)
    assert hide_threshold(F, 2 * bw, H=H, H_kv=H_kv) == pytest.approx(n / 2)  # faster link


def test_the_same_command_runs_as_one_rank_each_under_torchrun():
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(ring.free_port()), "-m", "fa_lab", "ring",
                          "--N", "64", "--H", "2", "--causal", "--layout", "zigzag",
                          "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("check: ok") == 1  # rank 0 reports, once
    assert "world=2" in run.stdout
