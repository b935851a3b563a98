"""One pass of every Numba kernel, forward and backward, as plain Python
(NUMBA_DISABLE_JIT=1), on tiny shapes.

Catches code that only works compiled, and gives real line coverage of the kernels.
"""

import os
import subprocess
import sys

SCRIPT = r"""
import numpy as np, fa_lab
from fa_lab.numerics import reference
from fa_lab.numerics.testing import Case, assert_close
for name in fa_lab.KERNELS:
    for causal in (False, "bottom_right"):
        c = Case(B=1, H=2, H_kv=1, Nq=5, Nk=7, d=3)
        q, k, v = c.inputs(np.float64)
        mask = np.ones((5, 7), bool); mask[1] = False
        kw = {"block_q": 2, "block_kv": 3} if fa_lab.KERNELS[name].tiled else {}
        out, lse = fa_lab.attention(q, k, v, causal=causal, mask=mask, kernel=name,
                                    return_lse=True, **kw)
        exp, exp_lse = reference.attention(q, k, v, causal=causal, mask=mask)
        assert_close(out, exp, what=name); assert_close(lse, exp_lse, what=name)
for name in fa_lab.BACKWARD_KERNELS:
    c = Case(B=1, H=2, H_kv=1, Nq=5, Nk=7, d=3)
    q, k, v = c.inputs(np.float64)
    opts = {"causal": "bottom_right", "dropout_p": 0.3, "seed": 4}
    out, lse = fa_lab.attention(q, k, v, return_lse=True, **opts)
    kw = {"block_q": 2, "block_kv": 3} if fa_lab.BACKWARD_KERNELS[name].tiled else {}
    got = fa_lab.attention_backward(q, k, v, out, lse, out, kernel=name, **opts, **kw)
    for g, e in zip(got, reference.attention_backward(q, k, v, out, **opts)):
        assert_close(g, e, what=name)
mods = {"window": (2, 0), "softcap": 1.5, "alibi_slopes": np.array([0.5, 0.25])}
c = Case(B=1, H=2, H_kv=1, Nq=5, Nk=7, d=3)
q, k, v = c.inputs(np.float64)
for name, kern in fa_lab.KERNELS.items():  # window, softcap, ALiBi
    if kern.window:
        kw = {"block_q": 2, "block_kv": 3} if kern.tiled else {}
        out, lse = fa_lab.attention(q, k, v, causal=True, kernel=name, return_lse=True,
                                    **mods, **kw)
        exp, exp_lse = reference.attention(q, k, v, causal=True, **mods)
        assert_close(out, exp, what=name); assert_close(lse, exp_lse, what=name)
out, lse = fa_lab.attention(q, k, v, return_lse=True, **mods)
got = fa_lab.attention_backward(q, k, v, out, lse, out, block_q=2, block_kv=3, **mods)
for g, e in zip(got, reference.attention_backward(q, k, v, out, **mods)):
    assert_close(g, e, what="backward with window, softcap, ALiBi")
from fa_lab.features.kvcache import paginate
qp, kp_, vp_ = (x[0].transpose(1, 0, 2) for x in (q, k, v))  # packed varlen: 2 sequences
cu = np.array([0, 2, 5]); cuk = np.array([0, 3, 7])
out = fa_lab.attention_varlen(qp, kp_, vp_, cu, cuk, causal=True, block_q=2, block_kv=2, **mods)
exp, _ = reference.attention(q[0, :, 2:], k[0, :, 3:], v[0, :, 3:], causal=True, **mods)
assert_close(out[2:].transpose(1, 0, 2), exp, what="varlen")
kc, vc = np.concatenate([k, k]), np.concatenate([v, v])  # a cache of B=2, S_max=7
kpg, vpg, table = paginate(kc, vc, 3, rng=np.random.default_rng(0))
got = fa_lab.attention_with_kvcache(np.concatenate([q, q])[:, :, :2], kpg, vpg,
                                    cache_seqlens=np.array([7, 4]), block_table=table,
                                    block_kv=2, **mods)
exp, _ = reference.attention(q[:, :, :2], k[:, :, :4], v[:, :, :4], causal="bottom_right",
                             **mods)
assert_close(got[1:], exp, what="paged kvcache")
print("nojit ok")
"""


def test_kernels_run_as_python():
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "nojit ok" in res.stdout
