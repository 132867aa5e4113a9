"""Numba fast path of :mod:`mllm_ref.nn.attention`: fused online-softmax ("flash") attention.

Same function, same signature, NumPy in and out, same validation and the same semantics (grouped-query heads,
causal mask aligned to the end of the keys, padding mask, all-masked rows give zeros).

Algorithm (Tri Dao et al., "FlashAttention", NeurIPS 2022, arXiv:2205.14135; the online softmax of Milakov and
Gimelshein, arXiv:1805.02867). The full ``[Tq, Tk]`` score matrix is never built. The query rows of one kv head
(its ``g = Hq/Hkv`` query heads times ``Tq`` queries) are cut into blocks of at most ``BQ`` rows; each
(batch, kv head, row block) is one work item, and the items run in parallel (``prange``). An item walks over the
keys in blocks of ``BK`` and keeps, for each of its rows, the running maximum ``m``, the running sum ``l`` and an
unnormalised output accumulator ``acc``::

    S      = scale * Q_blk K_blk^T                       (BQ x BK scores, masked entries set to NEG = -1e30)
    m_new  = max(m, rowmax(S));  alpha = exp(m - m_new);  P = exp(S - m_new)
    l      = alpha * l + rowsum(P);   acc = alpha * acc + P V_blk;   m = m_new
    out    = acc / l   (0 where l = 0: the row saw no allowed key)

Details that decide the speed on this CPU (PERF-NOTES.md sections 3 and "Numba codegen traps"):
- ``exp`` is the inlined float32 polynomial of :mod:`kernels_numba.nn._fastexp` (libm ``exp`` is a scalar call);
  masked scores use a large finite ``NEG`` rather than ``-inf``, so no inf/NaN arithmetic ever happens.
- Causal: key blocks past the last key any row of the item may see are skipped; within a block each row stops at
  its own limit ``Tk - Tq + t``. The items are ordered heavy/light alternately, so the two threads' static halves
  of the ``prange`` carry similar work.
- Scores of blocks with many rows use a transposed copy of the key block, so the inner loop is a contiguous
  ``S[i, :] += q[i, c] * Kt[c, :]`` over keys (vectorised without a horizontal reduction); blocks with few rows
  (decoding: the g query heads that share a kv head, ``Tq = 1``) use direct dot products, and the g heads read
  each key and value once.
- Calls with less than about 4 MFLOP of work run the same work items serially (a parallel region costs about
  2 us to start, PERF-NOTES.md section 6).
- Every inner loop runs over contiguous slices starting at 0, which avoids Numba's negative-index wraparound code.
- Row maxima use eight independent chains (:func:`kernels_numba.nn._common.row_max`).

NaN/inf in ``k`` or ``v`` raise the reference's ``ValueError``, but they are detected inside the kernel (a sum of
``0 * x`` over each block as it is loaded) rather than by a separate scan, which on a decode step would double the
memory traffic. So when an input is both non-finite and wrong in another way, the other error is reported first.

``return_weights=True`` falls back to a two-pass kernel that does materialise each row of scores (the weights are
an output then anyway): scores, row max, exp, normalise into the weights, then ``weights @ V``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels_numba.nn._common import FASTMATH, native, row_max
from kernels_numba.nn._fastexp import exp
from mllm_ref.nn.attention import _validate

__all__ = ["attention"]

BQ = 64  # query rows per work item
BK = 128  # keys per block
TRANSPOSE_MIN = 8  # rows from which the transposed-key score loop pays off
NEG = -1.0e30  # score of a masked (query, key) pair; exp(NEG - m) is exactly 0
PARALLEL_MIN_FLOPS = 4.0e6  # below about 50-100 us of work the serial kernel is used


@njit(cache=True, fastmath=FASTMATH)
def _flash_item(qv, k, v, mask, has_mask, causal, tq, scale, items, it, out, poison):
    """Work item ``it``: rows ``items[it, 2] : items[it, 3]`` of kv head ``items[it, 1]`` of batch ``items[it, 0]``.

    qv ``[B, Hkv, g*Tq, d]``, k ``[B, Hkv, Tk, d]``, v ``[B, Hkv, Tk, dv]``, mask bool ``[B, Tk]``; writes those rows
    of out ``[B, Hkv, g*Tq, dv]`` and ``poison[it]``: the sums of ``0 * k`` and ``0 * v`` over the blocks the item
    read (NaN iff one was not finite; every key and value is read by the item holding the last query row of its kv
    head).
    """
    t = qv.dtype.type
    neg = t(NEG)
    neg_half = t(NEG / 2)
    tk = k.shape[2]
    d = k.shape[3]
    dv = v.shape[3]
    b = items[it, 0]
    h = items[it, 1]
    r0 = items[it, 2]
    nr = items[it, 3] - r0
    # Scratch of this work item.
    acc = np.zeros((nr, dv), dtype=qv.dtype)
    m = np.full(nr, neg, dtype=qv.dtype)
    l = np.zeros(nr, dtype=qv.dtype)
    s_blk = np.empty((nr, BK), dtype=qv.dtype)
    kt = np.empty((d, BK), dtype=qv.dtype)
    qs = np.empty((nr, d), dtype=qv.dtype)
    kend = np.empty(nr, dtype=np.int64)  # each row sees keys [0, kend)
    kmax = 0
    for i in range(nr):
        row = qv[b, h, r0 + i]
        qsi = qs[i]
        for c in range(d):
            qsi[c] = row[c] * scale
        lim = tk
        if causal:
            lim = tk - tq + (r0 + i) % tq + 1
            lim = min(max(lim, 0), tk)
        kend[i] = lim
        kmax = max(kmax, lim)
    for kb in range(0, kmax, BK):
        nk = min(BK, kmax - kb)
        kblk = k[b, h, kb : kb + nk]
        vblk = v[b, h, kb : kb + nk]
        mblk = mask[b, kb : kb + nk]
        # Finiteness of the inputs, checked here while the block is in cache instead of in a separate pass
        # over the whole KV cache: 0 * x is 0 for finite x and NaN for NaN or inf.
        zk = t(0.0)
        zv = t(0.0)
        for j in range(nk):
            kj = kblk[j]
            vj = vblk[j]
            for c in range(d):
                zk += kj[c] * t(0.0)
            for c in range(dv):
                zv += vj[c] * t(0.0)
        poison[it, 0] += zk
        poison[it, 1] += zv
        # Scores S = (scale q) K^T for this key block.
        if nr >= TRANSPOSE_MIN:
            for j in range(nk):
                kj = kblk[j]
                for c in range(d):
                    kt[c, j] = kj[c]
            for i in range(nr):
                srow = s_blk[i, :nk]
                qsi = qs[i]
                for j in range(nk):
                    srow[j] = 0
                # Eight dimensions per sweep over the keys: one load and one store of the score row per
                # eight FMAs instead of per one (the row is too long to stay in registers).
                c = 0
                while c + 8 <= d:
                    q0, q1, q2, q3 = qsi[c], qsi[c + 1], qsi[c + 2], qsi[c + 3]
                    q4, q5, q6, q7 = qsi[c + 4], qsi[c + 5], qsi[c + 6], qsi[c + 7]
                    k0, k1, k2, k3 = kt[c, :nk], kt[c + 1, :nk], kt[c + 2, :nk], kt[c + 3, :nk]
                    k4, k5, k6, k7 = kt[c + 4, :nk], kt[c + 5, :nk], kt[c + 6, :nk], kt[c + 7, :nk]
                    for j in range(nk):
                        srow[j] += (
                            (q0 * k0[j] + q1 * k1[j]) + (q2 * k2[j] + q3 * k3[j])
                        ) + ((q4 * k4[j] + q5 * k5[j]) + (q6 * k6[j] + q7 * k7[j]))
                    c += 8
                while c < d:
                    qc = qsi[c]
                    ktc = kt[c, :nk]
                    for j in range(nk):
                        srow[j] += qc * ktc[j]
                    c += 1
        else:
            for i in range(nr):
                srow = s_blk[i]
                qsi = qs[i]
                for j in range(nk):
                    kj = kblk[j]
                    s = t(0.0)
                    for c in range(d):
                        s += qsi[c] * kj[c]
                    srow[j] = s
        # Online softmax update of each row.
        for i in range(nr):
            nvalid = min(kend[i] - kb, nk)  # causal: this row's keys in the block are [0, nvalid)
            if nvalid <= 0:
                continue
            srow = s_blk[i, :nvalid]
            if has_mask:
                mrow = mblk[:nvalid]
                for j in range(nvalid):
                    srow[j] = srow[j] if mrow[j] else neg
            mx = row_max(srow)
            if mx <= neg_half:
                continue  # every key of this block is padding for this row
            m_old = m[i]
            m_new = mx if mx > m_old else m_old
            alpha = exp(m_old - m_new)  # 0 on the row's first visible block (m_old = NEG)
            psum = t(0.0)
            for j in range(nvalid):
                p = exp(srow[j] - m_new)
                srow[j] = p
                psum += p
            l[i] = l[i] * alpha + psum
            ai = acc[i]
            if alpha != 1:
                for c in range(dv):
                    ai[c] *= alpha
            # acc += P V, four keys per sweep over the accumulator row (a quarter of its loads and stores).
            j = 0
            while j + 4 <= nvalid:
                p0, p1, p2, p3 = srow[j], srow[j + 1], srow[j + 2], srow[j + 3]
                v0, v1, v2, v3 = vblk[j], vblk[j + 1], vblk[j + 2], vblk[j + 3]
                for c in range(dv):
                    ai[c] += (p0 * v0[c] + p1 * v1[c]) + (p2 * v2[c] + p3 * v3[c])
                j += 4
            while j < nvalid:
                p = srow[j]
                vj = vblk[j]
                for c in range(dv):
                    ai[c] += p * vj[c]
                j += 1
            m[i] = m_new
    for i in range(nr):
        orow = out[b, h, r0 + i]
        ai = acc[i]
        if l[i] > 0:
            inv = t(1.0) / l[i]
            for c in range(dv):
                orow[c] = ai[c] * inv
        else:
            for c in range(dv):
                orow[c] = 0


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def _flash_parallel(qv, k, v, mask, has_mask, causal, tq, scale, items, out, poison):
    """All work items, in parallel (``prange``); see :func:`_flash_item`."""
    for it in prange(items.shape[0]):
        _flash_item(qv, k, v, mask, has_mask, causal, tq, scale, items, it, out, poison)


@njit(cache=True, fastmath=FASTMATH)
def _flash_serial(qv, k, v, mask, has_mask, causal, tq, scale, items, out, poison):
    """All work items, one after the other: for small calls, where starting a parallel region (about 2 us) and
    waking the second thread cost more than they save."""
    for it in range(items.shape[0]):
        _flash_item(qv, k, v, mask, has_mask, causal, tq, scale, items, it, out, poison)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def _with_weights(q, k, v, mask, has_mask, causal, scale, out, weights):
    """Two-pass attention that writes the weights ``[B, Hq, Tq, Tk]`` and ``out`` ``[B, Hq, Tq, dv]``."""
    t = q.dtype.type
    neg = t(NEG)
    bsz, hq, tq, d = q.shape
    hkv, tk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    for item in prange(bsz * hq):
        b = item // hq
        hh = item - b * hq
        h = hh // group
        qs = np.empty(d, dtype=q.dtype)
        for i in range(tq):
            wrow = weights[b, hh, i]
            orow = out[b, hh, i]
            qrow = q[b, hh, i]
            for c in range(d):
                qs[c] = qrow[c] * scale
            lim = tk
            if causal:
                lim = min(max(tk - tq + i + 1, 0), tk)
            for j in range(lim):
                kj = k[b, h, j]
                s = t(0.0)
                for c in range(d):
                    s += qs[c] * kj[c]
                wrow[j] = s if (not has_mask or mask[b, j]) else neg
            for j in range(lim, tk):
                wrow[j] = 0
            for c in range(dv):
                orow[c] = 0
            if lim == 0:
                continue
            seen = wrow[:lim]
            mx = row_max(seen)
            if mx <= t(NEG / 2):
                for j in range(lim):
                    seen[j] = 0
                continue
            total = t(0.0)
            for j in range(lim):
                p = exp(seen[j] - mx)
                seen[j] = p
                total += p
            inv = t(1.0) / total
            for j in range(lim):
                p = seen[j] * inv
                seen[j] = p
                vj = v[b, h, j]
                for c in range(dv):
                    orow[c] += p * vj[c]


def _work_items(bsz: int, hkv: int, group: int, tq: int, tk: int, causal: bool) -> np.ndarray:
    """Work items ``(b, kv head, first row, end row)`` over the ``group * tq`` query rows of each kv head.

    Long query runs (prefill) are cut per query head into blocks of BQ queries, so a block never mixes heads and
    the causal skip is tight. Short runs (decoding, short chunks) pack several query heads of the group into one
    item, so their shared keys and values are read once. Items are sorted by work (visible keys) and interleaved,
    so that contiguous halves of the list carry similar work.
    """
    rows = group * tq
    spans = []
    if tq >= BQ:
        for g in range(group):
            for t0 in range(0, tq, BQ):
                spans.append((g * tq + t0, g * tq + min(t0 + BQ, tq)))
    else:
        per = max(1, BQ // tq) * tq  # whole heads per item
        for r0 in range(0, rows, per):
            spans.append((r0, min(r0 + per, rows)))
    items = np.array([(b, h, r0, r1) for b in range(bsz) for h in range(hkv) for r0, r1 in spans], dtype=np.int64)
    if causal and len(items) > 2:
        last_t = (items[:, 3] - 1) % tq  # the row of the item that sees the most keys
        work = np.where(items[:, 3] - items[:, 2] >= tq, tk, np.clip(tk - tq + last_t + 1, 0, tk))
        order = np.argsort(-work, kind="stable")
        items = items[np.concatenate([order[0::2], order[1::2]])]
    return items


def attention(q, k, v, *, causal=False, key_mask=None, scale=None, return_weights=False):
    """Flash-style attention (see :func:`mllm_ref.nn.attention.attention` for the contract)."""
    # k and v are checked for NaN/inf inside the kernel (return_weights: here), not by a separate pass.
    q, k, v, causal, key_mask, scale, return_weights = _validate(
        q, k, v, causal, key_mask, scale, return_weights, finite_kv=return_weights
    )
    q, k, v = native(q), native(k), native(v)
    if q.dtype == np.float16:  # Numba has no float16 arithmetic: compute in float32, round once
        res = attention(
            q.astype(np.float32), k.astype(np.float32), v.astype(np.float32),
            causal=causal, key_mask=key_mask, scale=scale, return_weights=return_weights,
        )  # fmt: skip
        return tuple(r.astype(np.float16) for r in res) if return_weights else res.astype(np.float16)
    bsz, hq, tq, d = q.shape
    hkv, tk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    q = np.ascontiguousarray(q)
    k = np.ascontiguousarray(k)
    v = np.ascontiguousarray(v)
    has_mask = key_mask is not None
    mask = np.ascontiguousarray(key_mask) if has_mask else np.ones((bsz, tk), dtype=bool)
    scale = q.dtype.type(scale)
    if return_weights:
        out = np.empty((bsz, hq, tq, dv), dtype=q.dtype)
        weights = np.empty((bsz, hq, tq, tk), dtype=q.dtype)
        _with_weights(q, k, v, mask, has_mask, causal, scale, out, weights)
        return out, weights
    qv = q.reshape(bsz, hkv, group * tq, d)  # query head h*group + g, query t -> row g*tq + t of kv head h
    out = np.empty((bsz, hkv, group * tq, dv), dtype=q.dtype)
    items = _work_items(bsz, hkv, group, tq, tk, causal)
    poison = np.zeros((len(items), 2), dtype=q.dtype)
    flops = 2.0 * bsz * hq * tq * tk * (d + dv)  # upper bound (no causal skip)
    kernel = _flash_parallel if flops >= PARALLEL_MIN_FLOPS and len(items) > 1 else _flash_serial
    kernel(qv, k, v, mask, has_mask, causal, tq, scale, items, out, poison)
    for column, name in ((0, "k"), (1, "v")):
        if not np.all(poison[:, column] == 0):
            raise ValueError(f"{name} contains NaN or infinite values")  # the message of mllm_ref._checks
    return out.reshape(bsz, hq, tq, dv)
