"""The checked exercises of lessons 00, 02, 05, 06, 06b, 06c, 11 and 12 (see :mod:`.exercises`,
which serves them with the others through ``exercises.check``). Expected values come
from the library where it has the quantity: the FLOP convention of the timings
(:func:`fa_lab.numerics.reference.flops`), the tile classes
(:func:`fa_lab.numerics.tiling.tile_classes`), the GPU kernel's shared-memory and
occupancy budgets (:mod:`fa_lab.tools.gpu`); the rest is arithmetic on the shapes the
task states."""

from __future__ import annotations

from fa_lab.lessons.exercise_kit import Exercise, close, factor_of
from fa_lab.numerics import tiling
from fa_lab.numerics.reference import flops
from fa_lab.numerics.verdict import CLAIM_SLACK
from fa_lab.tools import gpu, traffic

MB_PER_MIB = 2**20 / 1e6


# ---------------------------------------------------------------- lesson 00

def _gflop():
    return flops(1, 8, 2048, 2048, 64, False) / 1e9


def _gflop_mistakes(answer, want):
    return factor_of(answer, want, {
        0.5: "that is one product; attention has two (S = Q Kᵀ and O = P V)",
        1 / 8: "that is one head; there are 8",
        2.0: "a multiply-add counts as 2 FLOPs once, not twice"})


def _scores_mib():
    return 8192 * 8192 * 4 / 2**20


def _scores_mistakes(answer, want):
    return factor_of(answer, want, {
        MB_PER_MIB: "MB (10^6 bytes), not MiB (2^20)",
        2.0: "float32 is 4 bytes, not 8",
        64 / 8192: "S is N x N, not N x d"})


# ---------------------------------------------------------------- lesson 02

def _tiles():
    visited = [int((tiling.tile_classes(1000, 1000, 64, 64, causal=c) != tiling.SKIPPED).sum())
               for c in (False, True)]
    return tuple(visited)


def _tiles_mistakes(answer, want):
    if tuple(answer) == (225, 120):
        return "1000 / 64 is 15.6: the last, partial tile is visited too (16 per side)"
    if answer[0] == want[0] and answer[1] == want[0] // 2:
        return ("half is the ideal; the diagonal tiles are visited whole (and masked "
                "inside): 16 x 17 / 2")
    return None


# ---------------------------------------------------------------- lesson 05

def _growth():
    return (4, 2)  # the N x N scores; the O(N) rows of FlashAttention's output and state


def _growth_mistakes(answer, want):
    if tuple(answer) == (2, 2):
        return "the standard algorithm stores N x N scores: doubling N quadruples them"
    if tuple(answer) == (4, 4):
        return "FlashAttention keeps tiles of fixed size and O(N) rows: it doubles"
    return None


def _min_mib():
    B, H, N, d = 1, 8, 4096, 64
    return (B * H * N * d + B * H * N) * 4 / 2**20  # O and the LSE, float32


def _min_mistakes(answer, want):
    if close(answer, 8.0, 1e-3):
        return "the output alone; an exact attention that can be merged keeps its LSE too"
    if close(answer, 32.0, 1e-3) or close(answer, 32.125, 1e-3):
        return "Q, K and V are inputs: they are already there; count what is written"
    return factor_of(answer, want, {MB_PER_MIB: "MB (10^6 bytes), not MiB (2^20)"})


# ---------------------------------------------------------------- lesson 06

def _rate():
    return flops(1, 8, 2048, 2048, 64, False) / 25e-3 / 1e9


def _rate_mistakes(answer, want):
    return factor_of(answer, want, {
        1e-3: "25 ms is 0.025 s: divide by seconds", 0.5: "count both products"})


def _causal_rate():
    return flops(1, 8, 2048, 2048, 64, True) / 14e-3 / 1e9


def _causal_mistakes(answer, want):
    return factor_of(answer, want, {
        2.0: "the convention counts half the FLOPs for causal (the scores above the "
             "diagonal are never computed)", 1e-3: "14 ms is 0.014 s: divide by seconds"})


# ---------------------------------------------------------------- lesson 06b

def _splits():
    B, H, Nk, threads = 1, 2, 8192, 8
    per_head = threads // (B * H)
    return (per_head, Nk // per_head)


def _splits_mistakes(answer, want):
    if answer[0] == 8:
        return "8 splits per head make 16 tasks: the 2 heads are tasks already (8 / 2)"
    if answer[0] == want[0] and answer[1] == 8192 // 8:
        return "each head has all 8192 keys: divide them by its 4 splits, not by the threads"
    if answer[0] == want[0]:
        return "the number of splits is right; each range holds 8192 / splits keys"
    return None


def _tile_kib():
    return traffic.tile_bytes(128, 64, 64, 4) / 1024


def _tile_mistakes(answer, want):
    no_state = 4 * (2 * 128 * 64 + 2 * 64 * 64 + 128 * 64) / 1024
    if close(answer, no_state, 1e-4):
        return "the row state counts too: m and ℓ, one float32 per row each"
    return factor_of(answer, want, {
        1.024: "KB (10^3 bytes), not KiB (2^10)", 0.5: "float32 is 4 bytes, not 2",
        2.0: "float32 is 4 bytes, not 8"}, rtol=1e-3)


# ---------------------------------------------------------------- lesson 06c

def _claim_range():
    return (110 / 33, 130 / 28)


def _claim_range_mistakes(answer, want):
    if close(answer[0], want[1], 2e-3) and close(answer[1], want[0], 2e-3):
        return "the right numbers in the wrong order: (low, high)"
    if close(answer[0], 110 / 28, 1e-3) or close(answer[1], 130 / 33, 1e-3):
        return ("the low end pairs standard's fastest quartile (110 ms) with flash's "
                "slowest (33 ms), the high end the other way round")
    if answer[0] < 1 and answer[1] < 1:
        return "a speedup is standard's time over flash's, not flash's over standard's"
    if close(answer[0], answer[1], 1e-3):
        return "a range from the quartiles, not the medians' single ratio"
    return None


def _claim_window():
    return (2 / CLAIM_SLACK, 4 * CLAIM_SLACK)


def _window_mistakes(answer, want):
    if close(answer[0], 2 * CLAIM_SLACK, 1e-3):
        return "widening moves the low end down: divide it by 1.25"
    if close(answer[0], 2.25, 1e-3) or close(answer[0], 1.75, 1e-3):
        return "1.25x is a factor, not +0.25"
    if close(answer[0], 2 * 0.75, 1e-3):
        return "dividing by 1.25 is x 0.8, not x 0.75"
    if close(answer[0], want[0], 1e-3):
        if close(answer[1], 4.0, 1e-3):
            return "the low end is right; widen the high end too (x 1.25)"
        if close(answer[1], 4 / CLAIM_SLACK, 1e-3):
            return "the low end is right; the high end moves up: multiply it by 1.25"
    return None


# ---------------------------------------------------------------- lesson 11

def _head_dim():
    return 384 // 12


def _head_dim_mistakes(answer, want):
    if answer == 384 // 6:
        return "the 6 is the number of layers; the hidden size is split over the 12 heads"
    if answer == 384:
        return "each head gets a slice of the hidden size"
    return None


def _gqa():
    H, H_kv = 32, 8
    return (H // H_kv, H // H_kv)


def _gqa_mistakes(answer, want):
    if answer[0] == 8:
        return "8 is the number of kv heads; each is read by 32 / 8 query heads"
    if answer[1] == 8:
        return "the cache holds 8 kv heads instead of 32: 32 / 8 times smaller"
    return None


# ---------------------------------------------------------------- lesson 12

def _smem_kib():
    return gpu.shared_memory_budget(64, 64, 64)["total"] / 1024


def _smem_mistakes(answer, want):
    return factor_of(answer, want, {
        2 / 3: "two tiles: the kernel keeps Q, K and V tiles in shared memory",
        1 / 3: "one tile; the kernel keeps Q, K and V tiles",
        4 / 3: "the scores stay in registers, not in shared memory"})


def _blocks():
    return gpu.occupancy(128, gpu.shared_memory_budget(64, 64, 64)["total"])["blocks_per_sm"]


def _blocks_mistakes(answer, want):
    if answer == 2048 // 128:
        return "that is the thread limit; shared memory allows fewer"
    if close(answer, 228 * 1024 / gpu.shared_memory_budget(64, 64, 64)["total"], 1e-3):
        return "blocks are whole: round down"
    return None


EXERCISES = {
    "gflop": Exercise(
        "00_tour",
        "How many GFLOP (10^9) is one attention call with B = 1, H = 8, N = 2048, d = 64, "
        "not causal, by the convention of the timings? Answer a number.",
        "two matrix products of 2 N^2 d FLOPs per head (a multiply-add is 2 FLOPs)",
        _gflop, _gflop_mistakes),
    "scores_mib": Exercise(
        "00_tour",
        "How many MiB does one head's score matrix S take at N = 8192 in float32? "
        "Answer a number.",
        "S holds one score per (query, key) pair, 4 bytes each; 1 MiB = 2**20 bytes",
        _scores_mib, _scores_mistakes),
    "tiles": Exercise(
        "02_tiling_and_simd",
        "With Nq = Nk = 1000 and 64 x 64 tiles, how many tiles does a tiled kernel visit "
        "without a mask, and with a (top-left) causal mask? Answer (not causal, causal).",
        "count tiles per side with a partial last one; causal skips tiles wholly above "
        "the diagonal", _tiles, _tiles_mistakes, rtol=0.0),
    "growth": Exercise(
        "05_memory_profiling",
        "When N doubles, by what factor does standard attention's peak grow (its score "
        "arrays dominate), and FlashAttention's extra memory? Answer (standard, flash).",
        "N x N against O(N)", _growth, _growth_mistakes, rtol=0.0),
    "min_mib": Exercise(
        "05_memory_profiling",
        "The least memory an exact attention call must write: its output and LSE, for "
        "B = 1, H = 8, N = 4096, d = 64 in float32. How many MiB? Answer a number.",
        "O is (B, H, N, d); the LSE one number per row", _min_mib, _min_mistakes),
    "rate": Exercise(
        "06_performance",
        "A non-causal call with B = 1, H = 8, N = 2048, d = 64 took 25 ms. How many "
        "GFLOP/s is that? Answer a number.",
        "the FLOPs of exercise 'gflop' in lesson 00, over seconds", _rate, _rate_mistakes),
    "causal_rate": Exercise(
        "06_performance",
        "The same shape with a causal mask took 14 ms. GFLOP/s, by the convention "
        "FlashAttention's benchmarks use? Answer a number.",
        "causal counts half the FLOPs", _causal_rate, _causal_mistakes),
    "decode_splits": Exercise(
        "06b_tuning",
        "A decode step (one query row per head) with B = 1, H = 2 and 8192 cached keys "
        "runs on 8 threads. Split-KV cuts each head's keys into equal ranges, one task "
        "each. How many ranges per head give every thread one task, and how many keys "
        "does each hold? Answer (ranges per head, keys per range). (plan_splits aims for "
        "two tasks per thread; here one is asked.)",
        "tasks = B x H x ranges per head", _splits, _splits_mistakes, rtol=0.0),
    "tile_kib": Exercise(
        "06b_tuning",
        "In the traffic model's count (traffic.tile_bytes), one block step with Br = 128, "
        "Bc = 64, d = 64 in float32 holds Q_i and its accumulator (Br x d each), K_j and "
        "V_j (Bc x d each), the scores S_ij (Br x Bc; P overwrites them) and the row state "
        "m, ℓ (Br each). How many KiB is that? Answer a number.",
        "count floats, times 4 bytes, over 1024", _tile_kib, _tile_mistakes, rtol=1e-3),
    "claim_range": Exercise(
        "06c_speed_claims",
        "NumPy's standard attention took a median 120 ms (quartiles 110-130 ms), flash "
        "30 ms (quartiles 28-33 ms). What speedup range does the claim's verdict judge, "
        "from its least to its most favourable pairing of quartiles? Answer (low, high), "
        "to 3 significant digits.",
        "low: standard's fastest over flash's slowest", _claim_range,
        _claim_range_mistakes, rtol=2e-3),
    "claim_window": Exercise(
        "06c_speed_claims",
        "A write-up claims a 2-4x speedup. A measurement reads 'consistent' when its whole "
        "quartile range lies in the claimed range widened by 1.25x either way. What is "
        "that window? Answer (low, high).",
        "widen both ends by the factor: down at the low end, up at the high end",
        _claim_window, _window_mistakes, rtol=1e-3),
    "head_dim": Exercise(
        "11_real_model",
        "all-MiniLM-L6-v2 has a hidden size of 384, 12 attention heads and 6 layers. "
        "What is each head's d? Answer a number.",
        "the heads split the hidden size", _head_dim, _head_dim_mistakes, rtol=0.0),
    "gqa": Exercise(
        "11_real_model",
        "A Llama-architecture decoder has 32 query heads and 8 kv heads (GQA). How many "
        "query heads read each kv head, and how many times smaller is its KV cache than "
        "with one kv head per query head? Answer (heads per kv head, factor).",
        "the cache holds kv heads only", _gqa, _gqa_mistakes, rtol=0.0),
    "smem_kib": Exercise(
        "12_gpu_kernel",
        "The cuda_fa2 kernel keeps its tiles in shared memory. With Br = Bc = 64, d = 64 "
        "and float32, how many KiB does one thread block need? Answer a number.",
        "which tiles of Q, K, V does a block hold at once?", _smem_kib, _smem_mistakes),
    "blocks_per_sm": Exercise(
        "12_gpu_kernel",
        "An SM with 228 KiB of shared memory, 2048 threads and at most 32 blocks runs "
        "those 128-thread blocks. How many can it keep resident? Answer a number.",
        "the tightest of the three limits, in whole blocks", _blocks, _blocks_mistakes,
        rtol=0.0),
}
