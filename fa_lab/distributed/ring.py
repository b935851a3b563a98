"""Ring attention on ``torch.distributed``: a sequence sharded over processes, K/V passed round.

Each of ``P`` ranks holds one shard of the sequence: its queries and the keys/values at
the same positions. Attention over the whole sequence is the merge
(:func:`fa_lab.merge_states`) of each query shard's partial attentions against every
K/V shard, so the K/V shards travel round a ring: at step ``t`` rank ``r`` computes
against the block that started on rank ``r - t`` while it already sends that block to
rank ``r + 1`` and receives the next one from rank ``r - 1`` (``isend``/``irecv``
overlapped with the local ``flash`` call). After ``P`` steps every query has seen every
key, and no rank ever held more than two K/V blocks.

Causal attention and the two layouts (:func:`shard`, chunks of ``N / (2P)``):

* ``"contiguous"``: rank ``r`` holds positions ``[r N/P, (r+1) N/P)``. Causally, rank
  ``r`` needs only the blocks of ranks ``<= r``: the last rank does ``P`` steps of work,
  the first one, so the ring waits for the slowest;
* ``"zigzag"``: rank ``r`` holds chunks ``r`` and ``2P-1-r``. Every step except the
  first costs half a block on every rank (the first half of the keys when the block comes
  from a lower rank, the second half of the queries when from a higher one): balanced.

The communication is gloo's point-to-point (it runs on CPUs, across processes and
machines). Every wait has a timeout; bad shards (lengths, heads or dtypes that differ
between ranks, a local argument error) raise the same ``ValueError`` on every rank after
one small ``all_gather``, never a hang. There is no backward.
"""

from __future__ import annotations

import time
from datetime import timedelta

import numpy as np

from fa_lab.api import attention
from fa_lab.numerics.checks import as_float_array, check_bool, check_choice, check_scale
from fa_lab.numerics.merge import merge_states

try:
    import torch
    import torch.distributed as dist
except ImportError:  # the optional torch extra
    torch = dist = None

LAYOUTS = ("contiguous", "zigzag")
#: The fields every rank must agree on, in the order of the metadata all_gather.
_FIELDS = ("local error", "B", "H", "H_kv", "N_local", "d", "dtype", "causal", "layout",
           "scale", "key_mask")
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _chunks(N, world, layout, name="N"):
    parts = world if layout == "contiguous" else 2 * world
    if N % parts:
        raise ValueError(f"{name}={N} must be divisible by {'world' if parts == world else '2 * world'}"
                         f" = {parts} for layout={layout!r}")
    return N // parts


def _check_world(rank, world):
    for name, x in (("rank", rank), ("world", world)):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {x!r}")
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")


def shard(x, rank: int, world: int, layout: str = "contiguous", axis: int = 2):
    """Rank ``rank``'s shard of ``x`` (a NumPy array or tensor) along ``axis`` (the sequence
    axis of ``(B, H, N, d)``; use ``axis=1`` for a ``(B, N)`` key mask).

    ``"contiguous"``: the ``rank``-th of ``world`` equal slices. ``"zigzag"``: chunks
    ``rank`` and ``2 world - 1 - rank`` of ``2 world`` equal chunks, concatenated."""
    _check_world(rank, world)
    check_choice("layout", layout, LAYOUTS)
    if not hasattr(x, "shape") or not -len(x.shape) <= axis < len(x.shape):
        raise ValueError(f"x must be an array with an axis {axis}, got {type(x).__name__}")
    c = _chunks(x.shape[axis], world, layout, name=f"x.shape[{axis}]")
    index = [slice(None)] * len(x.shape)

    def take(i):
        index[axis] = slice(i * c, (i + 1) * c)
        return x[tuple(index)]
    if layout == "contiguous":
        return take(rank)
    first, second = take(rank), take(2 * world - 1 - rank)
    if torch is not None and isinstance(x, torch.Tensor):
        return torch.cat([first, second], dim=axis)
    return np.concatenate([first, second], axis=axis)


def unshard(parts, layout: str = "contiguous", axis: int = 2):
    """The inverse of :func:`shard`: ``parts`` in rank order, reassembled along ``axis``."""
    check_choice("layout", layout, LAYOUTS)
    parts = list(parts)
    if not parts:
        raise ValueError("parts must hold one shard per rank, got none")
    shapes = {tuple(p.shape) for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"parts must all have one shape, got {sorted(shapes)}")
    is_torch = torch is not None and isinstance(parts[0], torch.Tensor)
    cat = (lambda xs: torch.cat(xs, dim=axis)) if is_torch else (
        lambda xs: np.concatenate(xs, axis=axis))
    if layout == "contiguous":
        return cat(parts)
    world, n = len(parts), parts[0].shape[axis]
    if n % 2:
        raise ValueError(f"zigzag shards hold two chunks: their length {n} must be even")
    index = [slice(None)] * len(parts[0].shape)

    def half(p, i):
        index[axis] = slice(i * (n // 2), (i + 1) * (n // 2))
        return p[tuple(index)]
    chunks = [None] * (2 * world)
    for r, p in enumerate(parts):
        chunks[r], chunks[2 * world - 1 - r] = half(p, 0), half(p, 1)
    return cat(chunks)


def _to_numpy(name, x):
    if torch is not None and isinstance(x, torch.Tensor):
        if x.requires_grad:
            raise ValueError(f"{name} requires grad: ring_attention has no backward; pass "
                             f"{name}.detach()")
        if x.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor, got device {x.device}")
        return x.numpy()
    return x


def _local(q, k, v, key_mask, causal, layout, scale):
    """The rank's own arguments, checked: (q, k, v, mask, causal, scale)."""
    q = as_float_array("q", _to_numpy("q", q))
    k, v = as_float_array("k", _to_numpy("k", k)), as_float_array("v", _to_numpy("v", v))
    causal = check_bool("causal", causal)
    check_choice("layout", layout, LAYOUTS)
    if q.ndim != 4:
        raise ValueError(f"q must be this rank's shard (B, H, N_local, d), got shape {q.shape}")
    B, H, n, d = q.shape
    if k.ndim != 4 or k.shape[0] != B or k.shape[2] != n or k.shape[3] != d:
        raise ValueError(f"k must be (B, H_kv, N_local, d) = ({B}, H_kv, {n}, {d}) (the "
                         f"keys at q's positions), got shape {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {k.shape}, got {v.shape}")
    if H % k.shape[1]:
        raise ValueError(f"q's heads H={H} must be a multiple of k's H_kv={k.shape[1]}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if layout == "zigzag" and n % 2:
        raise ValueError(f"layout='zigzag' shards hold two chunks: N_local={n} must be even")
    mask = None
    if key_mask is not None:
        mask = np.asarray(_to_numpy("key_mask", key_mask))
        if mask.dtype != np.bool_ or mask.shape != (B, n):
            raise ValueError(f"key_mask must be a bool array (B, N_local) = ({B}, {n}), "
                             f"True = attend, got {mask.dtype} {mask.shape}")
    return q, np.ascontiguousarray(k), np.ascontiguousarray(v), mask, causal, \
        check_scale(scale, d)


def _agree(meta, group, timeout, errors):
    """One all_gather of every rank's metadata; the same ValueError on every rank when a
    rank failed its local checks or the ranks disagree."""
    mine = torch.tensor(meta, dtype=torch.float64)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    _wait(dist.all_gather(gathered, mine, group=group, async_op=True), timeout, "all_gather")
    rows = [g.tolist() for g in gathered]
    if any(row[0] for row in rows):
        texts = [None] * world
        dist.all_gather_object(texts, errors, group=group)
        bad = "; ".join(f"rank {r}: {t}" for r, t in enumerate(texts) if t)
        raise ValueError(f"ring_attention: bad shard ({bad})")
    for i, field in enumerate(_FIELDS[1:], start=1):
        values = [row[i] for row in rows]
        if len(set(values)) > 1:
            shown = {"dtype": lambda x: str(_DTYPES[int(x)]),
                     "layout": lambda x: LAYOUTS[int(x)]}.get(field, lambda x: x)
            by_rank = ", ".join(f"rank {r}: {shown(x)}" for r, x in enumerate(values))
            what = "lengths that differ" if field == "N_local" else "values that differ"
            raise ValueError(f"ring_attention: every rank must pass the same {field}; got "
                             f"{what} ({by_rank})")


def _wait(work, timeout, what):
    try:
        work.wait(timeout=timedelta(seconds=timeout))
    except RuntimeError as exc:  # gloo reports a timeout as a RuntimeError
        raise TimeoutError(f"ring_attention: {what} did not complete within timeout="
                           f"{timeout} s (a rank that never called ring_attention, or a "
                           f"dead peer): {exc}") from exc


def _step(q, kv, mask, src, rank, causal, layout, scale):
    """This rank's partial state against the K/V block from rank ``src``: (rows, out, lse),
    ``rows`` the query slice it covers, or None when the block is entirely masked."""
    k, v = kv[0], kv[1]
    n, h = q.shape[2], q.shape[2] // 2
    kw = dict(scale=scale, return_lse=True)

    def run(qs, ks, vs, ms, c=False):
        m = None if ms is None else ms[:, None, None, :]
        return attention(qs, ks, vs, causal=c, mask=m, **kw)
    if not causal:
        return (slice(0, n), *run(q, k, v, mask))
    if src == rank:  # the diagonal block: top-left causal in both layouts
        return (slice(0, n), *run(q, k, v, mask, True))
    if layout == "contiguous":
        return (slice(0, n), *run(q, k, v, mask)) if src < rank else None
    if src < rank:  # zigzag: every query sees the block's first chunk, none its second
        return (slice(0, n), *run(q, k[:, :, :h], v[:, :, :h],
                                  None if mask is None else mask[:, :h]))
    return (slice(h, n), *run(q[:, :, h:], k, v, mask))  # only the late query chunk


def ring_attention(q, k, v, *, causal: bool = False, scale: float | None = None,
                   layout: str = "contiguous", group=None, return_lse: bool = False,
                   key_mask=None, timeout: float = 60.0, timings: list | None = None):
    """Attention over a sequence sharded across the ranks of a ``torch.distributed`` group.

    Call it on every rank of an initialised process group (gloo: ``init_process_group(
    "gloo", ...)``) with that rank's shard (:func:`shard`, the same ``layout``).

    Parameters
    ----------
    q : (B, H, N_local, d), float32 or float64, a NumPy array or a CPU tensor
    k, v : (B, H_kv, N_local, d), the keys and values at q's positions (``H % H_kv == 0``)
    causal : bool: top-left causal over the whole sequence (global positions)
    scale : float, optional: defaults to ``1 / sqrt(d)``
    layout : "contiguous" or "zigzag" (how the sequence was sharded)
    group : a process group, optional (default: the world)
    return_lse : bool: also return the rank's rows of the LSE, (B, H, N_local)
    key_mask : bool (B, N_local), optional: the rank's keys that may be attended (True)
    timeout : seconds every communication may take before a ``TimeoutError``
    timings : list, optional: receives one dict per ring step (``step``, ``src``,
        ``compute_s`` (wall), ``cpu_s`` (this process's CPU time meanwhile: the work,
        even when more ranks than cores share the CPU), ``wait_s`` (communication not
        hidden behind compute), ``bytes``)

    Returns the rank's shard of the output, (B, H, N_local, d) (and the LSE), as a tensor
    when ``q`` is one.
    """
    if dist is None:
        raise ImportError("fa_lab.distributed needs torch: pip install 'fa_lab[torch]'")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_attention: call torch.distributed.init_process_group first")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if timings is not None and not isinstance(timings, list):
        raise TypeError(f"timings must be a list or None, got {type(timings).__name__}")
    is_tensor = torch.is_tensor(q)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    error, meta = None, [0.0] * len(_FIELDS)
    try:
        q, k, v, mask, causal, scale = _local(q, k, v, key_mask, causal, layout, scale)
        B, H, n, d = q.shape
        meta = [0.0, B, H, k.shape[1], n, d, _DTYPES.index(q.dtype), causal,
                LAYOUTS.index(layout), scale, mask is not None]
    except (TypeError, ValueError) as exc:
        error, meta[0] = f"{type(exc).__name__}: {exc}", 1.0
    _agree(meta, group, timeout, error)

    def peer(r):
        r %= world
        return r if group is None else dist.get_global_rank(group, r)
    # two K/V buffers (k, v stacked; the key mask as a byte row) that take turns
    bufs = [torch.from_numpy(np.stack([k, v])), None]
    masks = [None if mask is None else torch.from_numpy(mask.astype(np.uint8)), None]
    if world > 1:
        bufs[1] = torch.empty_like(bufs[0])
        masks[1] = None if mask is None else torch.empty_like(masks[0])
    out = np.zeros(q.shape, q.dtype)
    lse = np.full(q.shape[:3], -np.inf, q.dtype)
    for step in range(world):
        cur, nxt = step % 2, (step + 1) % 2
        works = []
        if step < world - 1:  # pass the block on while computing with it
            works = [dist.isend(bufs[cur], peer(rank + 1), group=group),
                     dist.irecv(bufs[nxt], peer(rank - 1), group=group)]
            if mask is not None:
                works += [dist.isend(masks[cur], peer(rank + 1), group=group, tag=1),
                          dist.irecv(masks[nxt], peer(rank - 1), group=group, tag=1)]
        t0, c0 = time.perf_counter(), time.process_time()
        src = (rank - step) % world
        kv_mask = None if mask is None else masks[cur].numpy().astype(bool)
        part = _step(q, bufs[cur].numpy(), kv_mask, src, rank, causal, layout, scale)
        if part is not None:
            rows, o, s = part
            out[:, :, rows], lse[:, :, rows] = merge_states(out[:, :, rows], lse[:, :, rows], o, s)
        t1, c1 = time.perf_counter(), time.process_time()
        for w in works:
            _wait(w, timeout, f"step {step}'s send/recv")
        if timings is not None:
            timings.append({"step": step, "src": src, "compute_s": t1 - t0, "cpu_s": c1 - c0,
                            "wait_s": time.perf_counter() - t1,
                            "bytes": bufs[cur].numel() * bufs[cur].element_size()
                            if works else 0})
    if is_tensor:
        out, lse = torch.from_numpy(out), torch.from_numpy(lse)
    return (out, lse) if return_lse else out


def causal_work(world: int, layout: str) -> np.ndarray:
    """The causal work each rank does at each ring step, in units of one full
    ``N_local x N_local`` block product: a ``(world, world)`` array ``[rank, step]``."""
    _check_world(0, world)
    check_choice("layout", layout, LAYOUTS)
    work = np.zeros((world, world))
    for r in range(world):
        for t in range(world):
            src = (r - t) % world
            if src == r:
                work[r, t] = 0.5
            elif layout == "contiguous":
                work[r, t] = 1.0 if src < r else 0.0
            else:
                work[r, t] = 0.5
    return work


__all__ = ["ring_attention", "shard", "unshard", "causal_work", "LAYOUTS"]
