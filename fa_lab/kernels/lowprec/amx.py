"""Attention on Intel AMX tiles: ``Q K^T`` and ``P V`` on the matrix engine, the online
softmax in fp32 zmm vectors between them (:mod:`.amx_softmax`).

Two inputs, one driver (:func:`amx_forward`):

* **INT8** (``attention_int8(kernel="amx")``, SageAttention's recipe): ``S = Qi Kj^T``
  by ``tdpbssd`` on int8 Q and int8 K (per-row scales applied in the softmax), ``P``
  rounded to bf16 and ``acc += P Vj`` by ``tdpbf16ps`` with V stored bf16 (fp32
  accumulation);
* **bf16** (``attention`` on ``bfloat16`` inputs): both products by ``tdpbf16ps`` on bf16
  Q, K, V (float32 inputs are rounded to bf16 first), fp32 softmax and accumulation, as
  PyTorch's bf16 SDPA does.

Per task (b, h, query block of ``Br`` rows, padded to 32), over key blocks of ``Bc`` keys
(a multiple of 32; causal blocks past the diagonal skipped): the score tiles (2 x 2
output tiles of 16 x 16, one pair of Q tiles and one pair of K tiles per step of 64
bytes of ``d``), the softmax, then ``acc = alpha acc`` and the ``P V`` tiles (2 x 2 output
tiles of fp32 accumulators loaded from ``acc``, 32 channels at a time). Every parallel
body runs ``ldtilecfg`` first and ``tilerelease`` last; every packed operand and scratch
array is 64-byte aligned, every tile row stride a multiple of 64 bytes.

Operands are packed once per call (:mod:`.amx_pack`). Pad keys have zero scales and
zero values and are never in the softmax. A masked block whose V holds NaN/inf (flag per
head) uses a scalar ``P V`` over the visible keys only (a hidden NaN must not reach a
row: ``0 x NaN`` is NaN).

Why this shape (lesson 10 measures each part on the reader's machine with
:func:`fa_lab.tools.lowprec.amx.breakdown`): packing goes by 4-byte words; the softmax
works on the raw int32 products (no fp32 score tile is written; the row max is a
``vpmaxsd``), the causal diagonal fused in, because with both products on the matrix
engine the exponentials are the largest part left (the ablations of
:class:`~fa_lab.kernels.common.Stage`, ``NO_EXP`` ..., time the kernel without each
pass). Two ways to hide them were measured slower and are not used: interleaving the
previous block's ``P V`` tile steps with the exp rows, and FlashAttention-4's lazy
rescaling (one pass per row against a running max). On the causal diagonal, a block's
keys stop at its last row's diagonal (no tile is computed for keys no row sees).

Nothing here may be compiled on a CPU without AMX (LLVM aborts):
:func:`fa_lab.settings.cpu_features.amx_unavailable` first; the registry does.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from fa_lab.settings import cpu_features
from fa_lab.settings import config
from fa_lab.settings.config import CACHE
from fa_lab.kernels.lowprec.amx_pack import pack
from fa_lab.kernels.lowprec.amx_softmax import dequantize, softmax_fused
from fa_lab.kernels.lowprec.amx_tiles import (FULL_CFG, dot_2x2, ldtilecfg, tdpbf16ps,
                                              tileloadd, tilerelease, tilestored, tilezero)
from fa_lab.kernels.common import (NEG_INF, NRT_ARRAY_OVERHEAD, Stage, finalize_row, mask_block,
                                   task_coords, visible_end)
from fa_lab.kernels.ladder.flash import bits_f32
from fa_lab.kernels.lowprec.vsoftmax import softmax
from fa_lab.kernels.lowprec.zmm import align64
from fa_lab.numerics.masks import causal_offset



@njit(cache=CACHE, nogil=True, error_model="numpy")
def _scores(Qp, rowb, nch, Kp, kc0, bcp, S, ld, brp, bf16):
    """``S`` (brp x bcp, stride ``ld`` int32/fp32) = Q rows (``Qp`` from the block's first
    row, ``rowb`` bytes per row) times the keys of chunks ``kc0 ..`` (32 keys each)."""
    for s in range(0, brp, 32):
        for kc in range(bcp // 32):
            tilezero(0)
            tilezero(1)
            tilezero(2)
            tilezero(3)
            for ch in range(nch):
                tileloadd(4, Qp, s * rowb + ch * 64, rowb)
                tileloadd(5, Qp, (s + 16) * rowb + ch * 64, rowb)
                g = 2 * (kc0 + kc)  # groups of 16 keys
                tileloadd(6, Kp, (g * nch + ch) * 1024, 64)
                tileloadd(7, Kp, ((g + 1) * nch + ch) * 1024, 64)
                dot_2x2(bf16)
            o0, o1 = (s * ld + kc * 32) * 4, ((s + 16) * ld + kc * 32) * 4
            tilestored(0, S, o0, ld * 4)
            tilestored(1, S, o0 + 64, ld * 4)
            tilestored(2, S, o1, ld * 4)
            tilestored(3, S, o1 + 64, ld * 4)


@njit(cache=CACHE, nogil=True, error_model="numpy")
def _pv(P, ld, Vp, kc0, bcp, acc, dv, brp, br, alpha):
    """``acc = alpha acc + P V`` for the block's chunks ``kc0 ..``: rows rescaled in fp32,
    then 2 x 2 accumulator tiles (32 rows x 32 channels) loaded from ``acc``."""
    for r in range(br):
        if alpha[r] != 1:
            a = acc[r * dv:(r + 1) * dv]
            for t in range(dv):
                a[t] *= alpha[r]
    ncg = dv // 16
    for s in range(0, brp, 32):
        for cp in range(0, dv, 32):
            o0, o1 = (s * dv + cp) * 4, ((s + 16) * dv + cp) * 4
            tileloadd(0, acc, o0, dv * 4)
            tileloadd(1, acc, o0 + 64, dv * 4)
            tileloadd(2, acc, o1, dv * 4)
            tileloadd(3, acc, o1 + 64, dv * 4)
            for kc in range(bcp // 32):
                tileloadd(4, P, (s * ld + kc * 32) * 2, ld * 2)
                tileloadd(5, P, ((s + 16) * ld + kc * 32) * 2, ld * 2)
                vt = ((kc0 + kc) * ncg + cp // 16) * 1024
                tileloadd(6, Vp, vt, 64)
                tileloadd(7, Vp, vt + 1024, 64)
                tdpbf16ps(0, 4, 6)
                tdpbf16ps(1, 4, 7)
                tdpbf16ps(2, 5, 6)
                tdpbf16ps(3, 5, 7)
            tilestored(0, acc, o0, dv * 4)
            tilestored(1, acc, o0 + 64, dv * 4)
            tilestored(2, acc, o1, dv * 4)
            tilestored(3, acc, o1 + 64, dv * 4)


@njit(cache=CACHE, nogil=True, error_model="numpy")
def _pv_visible(S, P, ld, br, bc, v, j0, alpha, acc, dv):
    """``acc = alpha acc + P V`` over the visible keys only (score not ``-inf``), in fp32
    with the original V: a masked block whose V holds NaN or inf."""
    d = v.shape[1]
    for r in range(br):
        a = acc[r * dv:r * dv + d]
        for t in range(d):
            a[t] *= alpha[r]
        for c in range(bc):
            if S[r * ld + c] == NEG_INF:
                continue
            p = bits_f32(np.int32(P[r * ld + c]) << np.int32(16))
            for t in range(d):
                a[t] += p * f32_of(v[j0 + c, t])


def f32_of(x):
    """A value of V as float32: itself, or the float of its bf16 bits (uint16)."""


@overload(f32_of, jit_options={"cache": CACHE})
def _f32_of_overload(x):
    if x == types.uint16:
        return lambda x: bits_f32(np.int32(x) << np.int32(16))
    return lambda x: x


@njit(cache=CACHE, nogil=True, error_model="numpy")
def _block_softmax(Sraw, S, P, ld, br, bc, bcp, sk, rs, m, l, alpha, general, bias, has_bias,
                   b, h, i0, j0, diagonal, offset, skip):
    """The softmax of one block (:mod:`.amx_softmax`): fused, or (``general``, or keys
    with different scales) dequantize + mask + sage's softmax."""
    ks = sk[0]
    for c in range(1, bc):
        general |= sk[c] != ks
    if not general:
        first = i0 + offset + 1 - j0 if diagonal else bc
        softmax_fused(Sraw, ld, br, bc, bcp, ks, rs, first, m, l, alpha, P, skip)
        return
    dequantize(Sraw, ld, br, bc, sk, rs, S)
    if has_bias or diagonal:
        mask_block(S[:br * ld].reshape((br, ld))[:, :bc], bias, has_bias, b, h, i0, j0,
                   diagonal, offset)
    softmax(S, ld, br, bc, m, l, alpha, P)


@njit(cache=CACHE, parallel=True, nogil=True, error_model="numpy")
def amx_forward(Qp, rs, Kp, skp, Vp, vfin, v, bias, has_bias, causal, offset, block_q,
                block_kv, out, lse, cfg, positive_scale, stage=3):
    """Parallel driver over (b, h, query block); ``Qp`` uint16 = the bf16 path, int8 = the
    INT8 path; ``block_kv`` a multiple of 32; ``positive_scale``: the fused softmax may
    be used; ``stage``: see :class:`~fa_lab.kernels.common.Stage`."""
    B, H, Nq, d = out.shape
    Hkv, Nk = v.shape[1], v.shape[2]
    group = H // Hkv
    bf16 = Qp.itemsize == 2
    Nqp, Nkp = rs.shape[0] // (B * H), skp.shape[0] // (B * Hkv)
    dq = Qp.shape[0] // (B * H * Nqp)
    rowb, nch = dq * Qp.itemsize, dq * Qp.itemsize // 64
    dv = Vp.shape[0] // (B * Hkv * Nkp)
    ktile = nch * 1024 // Kp.itemsize  # elements of Kp per group of 16 keys
    Tr = (Nq + block_q - 1) // block_q
    for task in prange(B * H * Tr):
        b, h, i0 = task_coords(task, H, Tr, block_q)
        bh, bhk = b * H + h, b * Hkv + h // group
        br = min(block_q, Nq - i0)
        brp = -(-br // 32) * 32
        ld = block_kv
        Sraw = align64(np.empty(brp * ld + 16, np.int32), brp * ld)
        S = align64(np.empty(brp * ld + 16, np.float32), brp * ld)
        P = align64(np.zeros(brp * ld + 32, np.uint16), brp * ld)
        acc = align64(np.zeros(brp * dv + 16, np.float32), brp * dv)
        m = np.full(brp, NEG_INF, np.float32)
        l = np.zeros(brp, np.float32)
        alpha = np.ones(brp, np.float32)
        Qb, rsb = Qp[(bh * Nqp + i0) * dq:], rs[bh * Nqp + i0:]
        Kb, skb, Vb = Kp[bhk * (Nkp // 16) * ktile:], skp[bhk * Nkp:], Vp[bhk * Nkp * dv:]
        Sf = Sraw.view(np.float32)
        ldtilecfg(cfg)  # per thread: every body loads the configuration
        for j0 in range(0, visible_end(i0 + br - 1, Nk, causal, offset), block_kv):
            if stage < 1:
                continue
            full = min(block_kv, Nk - j0)
            bc = min(full, i0 + offset + br - j0) if causal else full  # keys past the
            bcp = -(-bc // 32) * 32  # block's last diagonal: no row sees them
            diagonal = causal and j0 + bc > i0 + offset + 1
            masked = has_bias or diagonal
            _scores(Qb, rowb, nch, Kb, j0 // 32, bcp, Sraw, ld, brp, bf16)
            if stage < 2:
                continue
            # keys bc..bcp are real ones when the block was cut (not V's zero padding):
            # P = 0 there must not meet a NaN or inf of V, so the visible-keys P V runs
            hidden_nan = (masked or bc < full) and not vfin[bhk]
            general = has_bias or hidden_nan or not positive_scale
            skip = stage - 3 if stage > 3 else 0  # an ablation (Stage.NO_EXP ...)
            if skip == 3:
                pass
            elif bf16:
                _block_softmax(Sf, S, P, ld, br, bc, bcp, skb[j0:], rsb, m, l, alpha, general,
                               bias, has_bias, b, h, i0, j0, diagonal, offset, skip)
            else:
                _block_softmax(Sraw, S, P, ld, br, bc, bcp, skb[j0:], rsb, m, l, alpha,
                               general, bias, has_bias, b, h, i0, j0, diagonal, offset, skip)
            if stage < 3:
                continue
            if hidden_nan:
                _pv_visible(S, P, ld, br, bc, v[b, h // group], j0, alpha, acc, dv)
            else:
                _pv(P, ld, Vb, j0 // 32, bcp, acc, dv, brp, br, alpha)
        tilerelease()
        for r in range(br):
            lse[b, h, i0 + r] = finalize_row(acc[r * dv:r * dv + d], m[r], l[r],
                                             out[b, h, i0 + r])


def scratch_bytes(*, B, H, Nq, d, block_q, block_kv, threads, **_):
    """Per running task: raw and fp32 scores, bf16 P (``Br x Bc``, rows padded to 32),
    acc (``Br x d``, padded to 32 channels) and three row vectors."""
    tasks = B * H * -(-Nq // block_q)
    live = max(1, min(threads, tasks))
    brp, bkp, dv = _up(block_q, 32), _up(block_kv, 32), _up(d, 32)
    per = 10 * brp * bkp + 4 * brp * dv + 12 * brp + 8 * NRT_ARRAY_OVERHEAD
    return {f"tiles (S raw, S, P, acc, row state) x {live} threads": live * per}


def _up(x, m):
    return -(-x // m) * m


def packed_call(q, rowscale, k, keyscale, v, bias, scale, alignment, block_q=None,
                block_kv=None):
    """Pack once and return ``forward(stage=Stage.FULL) -> (out, lse)``
    (:class:`~fa_lab.kernels.common.Stage`; ``Stage.PACK`` runs nothing after the packing:
    zeros and ``lse = -inf``). ``block_kv`` is rounded up to a multiple of 32."""
    B, H, Nq, d = q.shape
    Nk = k.shape[2]
    if Nk == 0:
        return lambda stage=Stage.FULL: (np.zeros((B, H, Nq, d), np.float32),
                                   np.full((B, H, Nq), -np.inf, np.float32))
    bq = int(block_q or config.AMX_BLOCKS[0])
    bk = _up(int(block_kv or config.AMX_BLOCKS[1]), 32)
    packed = pack(q, rowscale, k, keyscale, v, scale, bk)
    offset = causal_offset(Nq, Nk, alignment) if alignment else 0
    has_bias = bias is not None
    bias = bias if has_bias else np.broadcast_to(np.zeros((), np.float32), (1, 1, 1, 1))

    def forward(stage=Stage.FULL):
        if stage < 0:  # packing only (the breakdown)
            return (np.zeros((B, H, Nq, d), np.float32),
                    np.full((B, H, Nq), -np.inf, np.float32))
        out = np.empty((B, H, Nq, d), np.float32)
        lse = np.empty((B, H, Nq), np.float32)
        amx_forward(*packed, v, bias, has_bias, alignment is not None, offset, bq, bk, out,
                    lse, FULL_CFG, scale > 0, int(stage))
        return out, lse
    return forward


def unavailable() -> str | None:
    """Why the AMX kernels cannot run here (None if they can): the registry's check."""
    return cpu_features.amx_unavailable()


def _ready():
    why = unavailable()
    if why:
        raise NotImplementedError(why)


def run_int8(arrays, bias, scale, alignment, block_q=None, block_kv=None, *,
             pv_dtype="bfloat16", stage=Stage.FULL):
    """The registry's INT8 runner (``arrays = (q8, sq, k8, sk, v)``); ``P V`` is bf16."""
    if pv_dtype != "bfloat16":
        raise ValueError(f"pv_dtype: the AMX kernel computes P V in bf16, got {pv_dtype!r}")
    _ready()
    q8, sq, k8, sk, v = arrays
    return packed_call(q8, sq, k8, sk, v, bias, scale, alignment, block_q, block_kv)(stage)


def run_bf16(arrays, bias, scale, alignment, block_q=None, block_kv=None, *, stage=Stage.FULL):
    """The registry's bf16 runner (``arrays = (q, k, v)``: float32, rounded to bf16, or
    bf16 bits in uint16 arrays, packed as they are)."""
    _ready()
    q, k, v = arrays
    ones_q = np.ones(q.shape[:3], np.float32)
    ones_k = np.ones(k.shape[:3], np.float32)
    return packed_call(q, ones_q, k, ones_k, v, bias, scale, alignment, block_q,
                       block_kv)(stage)
