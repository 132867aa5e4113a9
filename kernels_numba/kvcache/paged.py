"""Numba fast path of :mod:`mllm_ref.kvcache.paged`: decode attention that reads the blocks in place.

Same function and signature as :func:`mllm_ref.kvcache.paged.paged_attention`, NumPy in and out. The reference
gathers each sequence's blocks into a contiguous copy (one read and one write of the whole cache) and then attends
over the copy; here the cache is read once, where it lies in the pool. A work item is one sequence and a range of
its kv heads (the whole range when running serially; cut so that each thread gets about two items otherwise). It
walks the block table block by block, all heads of its range per block, so each block's ``[Hkv, Bs, d]`` bytes
are read in one contiguous sweep:

1. scores: for each cached token ``t`` (block ``table[t // Bs]``, slot ``t % Bs``) and each of the ``g = H / Hkv``
   query heads sharing a kv head, the dot product; four query heads at a time share each load of a key element
   (twice as fast as one head at a time for ``g = 4``, measured);
2. softmax over the ``C_b`` scores of each head (row maximum with eight independent chains, the inlined
   polynomial ``exp`` of :mod:`kernels_numba.nn._fastexp`);
3. ``out = sum_t p_t V[t] / sum_t p_t``, four value rows per pass over the accumulator row (which is then loaded
   and stored a quarter as often; the store-bound one-row loop ran at about half the speed).

The items run in parallel (``prange``, longest contexts first) when the call reads at least about 1 MB, serially
otherwise (a parallel region costs about 2 us). NaN/inf in the pool raise the reference's ``ValueError``: values
that are read are caught on the way (a non-finite key makes its scores non-finite for every head, a non-finite
value the output), and the slots no sequence reads are scanned by a second small kernel, so the pool is read once
in all.

Measured on this 2-core machine (``mllm-ref bench`` cases, cold caches of about 130 MB, 1 / 2 threads): 32 heads
of 128 over 4096 tokens in blocks of 16, 8-9 ms / 5 ms against the reference's ~100 ms (x12 / x19, 14-26 GB/s);
four GQA sequences (32 query and 8 kv heads, 3077-4096 tokens) 14-16 ms / 8-9 ms (x6 / x10). Short of the
36-41 GB/s bandwidth roof: the kernel is still partly compute-bound (a horizontal sum per dot product).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from kernels_numba.nn._common import FASTMATH, native, row_max
from kernels_numba.nn._fastexp import exp
from mllm_ref.kvcache.paged import _validate

__all__ = ["paged_attention"]

PARALLEL_MIN_BYTES = 1 << 20  # below about 1 MB of cache read the serial kernel is used (a region costs ~2 us)


@njit(cache=True, fastmath=FASTMATH)
def _item(q, kb, vb, tables, lens, scale, b, j0, j1, group, out, bad):
    """Sequence ``b``, kv heads ``j0 .. j1 - 1`` (and their query heads): scores, softmax, weighted values."""
    c = lens[b]
    bs = kb.shape[2]
    d = q.shape[2]
    dv = vb.shape[3]
    rows = (j1 - j0) * group  # query heads j0 * group .. j1 * group - 1
    h0 = j0 * group
    zero = q.dtype.type(0.0)
    if c == 0:
        for r in range(rows):
            out[b, h0 + r, :] = zero
        return
    nb = (c + bs - 1) // bs
    scores = np.empty((rows, nb * bs), dtype=q.dtype)
    qs = q[b, h0 : h0 + rows]
    for i in range(nb):  # block by block, all heads of the range: the block's bytes are read in one sweep
        blk = tables[b, i]
        n = min(bs, c - i * bs)
        for j in range(j0, j1):
            kblk = kb[blk, j]
            r0 = (j - j0) * group
            g = 0
            while g + 4 <= group:  # four query heads per pass over a key row (each key element loaded once)
                q0, q1, q2, q3 = qs[r0 + g], qs[r0 + g + 1], qs[r0 + g + 2], qs[r0 + g + 3]
                s0 = scores[r0 + g, i * bs : i * bs + n]
                s1 = scores[r0 + g + 1, i * bs : i * bs + n]
                s2 = scores[r0 + g + 2, i * bs : i * bs + n]
                s3 = scores[r0 + g + 3, i * bs : i * bs + n]
                for t in range(n):
                    kr = kblk[t]
                    a0 = a1 = a2 = a3 = zero
                    for x in range(d):
                        kx = kr[x]
                        a0 += q0[x] * kx
                        a1 += q1[x] * kx
                        a2 += q2[x] * kx
                        a3 += q3[x] * kx
                    s0[t] = a0 * scale
                    s1[t] = a1 * scale
                    s2[t] = a2 * scale
                    s3[t] = a3 * scale
                g += 4
            for gg in range(g, group):
                qr = qs[r0 + gg]
                srow = scores[r0 + gg, i * bs : i * bs + n]
                for t in range(n):
                    kr = kblk[t]
                    acc = zero
                    for x in range(d):
                        acc += qr[x] * kr[x]
                    srow[t] = acc * scale
    total = np.empty(rows, dtype=q.dtype)
    poison = zero
    for r in range(rows):
        srow = scores[r, :c]
        m = row_max(srow)
        s = zero
        for t in range(c):
            poison += srow[t] * zero
            e = exp(srow[t] - m)
            srow[t] = e
            s += e
        total[r] = s
    if poison != zero:
        bad[b, j0, 0] = 1
        return
    acc = np.zeros((rows, dv), dtype=q.dtype)
    for i in range(nb):
        blk = tables[b, i]
        n = min(bs, c - i * bs)
        for j in range(j0, j1):
            vblk = vb[blk, j]
            for g in range(group):
                r = (j - j0) * group + g
                ar = acc[r]
                prow = scores[r, i * bs : i * bs + n]
                t = 0
                while t + 4 <= n:  # four value rows per pass over the accumulator (loaded and stored once)
                    v0, v1, v2, v3 = vblk[t], vblk[t + 1], vblk[t + 2], vblk[t + 3]
                    w0, w1, w2, w3 = prow[t], prow[t + 1], prow[t + 2], prow[t + 3]
                    for x in range(dv):
                        ar[x] += (w0 * v0[x] + w1 * v1[x]) + (w2 * v2[x] + w3 * v3[x])
                    t += 4
                for u in range(t, n):
                    vr = vblk[u]
                    w = prow[u]
                    for x in range(dv):
                        ar[x] += w * vr[x]
    vpoison = zero
    for r in range(rows):
        inv = q.dtype.type(1.0) / total[r]
        ar = acc[r]
        orow = out[b, h0 + r]
        for x in range(dv):
            vpoison += ar[x] * zero
            orow[x] = ar[x] * inv
    if vpoison != zero:
        bad[b, j0, 1] = 1


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def _attend_parallel(q, kb, vb, tables, lens, scale, group, items, out, bad):
    for it in prange(items.shape[0]):
        _item(q, kb, vb, tables, lens, scale, items[it, 0], items[it, 1], items[it, 2], group, out, bad)


@njit(cache=True, fastmath=FASTMATH)
def _attend_serial(q, kb, vb, tables, lens, scale, group, items, out, bad):
    for it in range(items.shape[0]):
        _item(q, kb, vb, tables, lens, scale, items[it, 0], items[it, 1], items[it, 2], group, out, bad)


def _work_items(lens: np.ndarray, hkv: int, threads: int) -> np.ndarray:
    """``int64[I, 3]`` rows ``(sequence, first kv head, end kv head)``: each sequence's kv heads cut into enough
    ranges that every thread gets about two items; longest contexts first, so the threads' static shares of the
    ``prange`` carry similar work."""
    b = lens.shape[0]
    chunks = min(hkv, max(1, -(-2 * threads // max(b, 1))))
    bounds = np.linspace(0, hkv, chunks + 1).round().astype(np.int64)
    items = np.array([(i, bounds[c], bounds[c + 1]) for i in range(b) for c in range(chunks)], dtype=np.int64)
    order = np.argsort(-lens[items[:, 0]] * (items[:, 2] - items[:, 1]), kind="stable")
    items = items[order]
    return np.concatenate([items[0::2], items[1::2]]) if len(items) > 2 else items


@njit(cache=True, fastmath=FASTMATH)
def _unread_finite(kb, vb, read):
    """(keys finite, values finite) over the slots that no sequence reads (``read[n, s]`` false)."""
    zero = kb.dtype.type(0.0)
    pk = zero
    pv = zero
    for n in range(kb.shape[0]):
        for s in range(kb.shape[2]):
            if read[n, s]:
                continue
            for j in range(kb.shape[1]):
                kr = kb[n, j, s]
                for x in range(kr.shape[0]):
                    pk += kr[x] * zero
                vr = vb[n, j, s]
                for x in range(vr.shape[0]):
                    pv += vr[x] * zero
    return pk == zero, pv == zero


def paged_attention(q, k_blocks, v_blocks, block_tables, context_lens, scale=None):
    """Paged decode attention (see :func:`mllm_ref.kvcache.paged.paged_attention`)."""
    q, kb, vb, tables, lens, scale = _validate(q, k_blocks, v_blocks, block_tables, context_lens, scale,
                                               finite_kv=False)  # fmt: skip
    if q.dtype == np.float16:  # Numba has no float16 arithmetic: compute in float32, round once
        return paged_attention(q.astype(np.float32), kb.astype(np.float32), vb.astype(np.float32), tables, lens,
                               scale).astype(np.float16)  # fmt: skip
    q = np.ascontiguousarray(native(q))
    kb = np.ascontiguousarray(native(kb))
    vb = np.ascontiguousarray(native(vb))
    tables = np.ascontiguousarray(tables)
    b, h, _ = q.shape
    n, hkv, bs, d = kb.shape
    dv = vb.shape[3]
    out = np.empty((b, h, dv), dtype=q.dtype)
    bad = np.zeros((b, hkv, 2), dtype=np.uint8)
    read = np.zeros((n, bs), dtype=np.bool_)
    for i in range(b):
        c = int(lens[i])
        full = c // bs
        read[tables[i, :full]] = True
        if c % bs:
            read[tables[i, full], : c % bs] = True
    work = float(lens.sum()) * hkv * (d + dv) * q.itemsize
    parallel = work >= PARALLEL_MIN_BYTES and numba.get_num_threads() > 1
    items = _work_items(lens, hkv, numba.get_num_threads() if parallel else 1)
    kernel = _attend_parallel if parallel and len(items) > 1 else _attend_serial
    kernel(q, kb, vb, tables, lens, q.dtype.type(scale), h // hkv, items, out, bad)
    k_ok, v_ok = (True, True) if read.all() else _unread_finite(kb, vb, read)
    if bad[:, :, 0].any() or not k_ok:
        raise ValueError("k_blocks contains NaN or infinite values")  # the message of mllm_ref._checks
    if bad[:, :, 1].any() or not v_ok:
        raise ValueError("v_blocks contains NaN or infinite values")
    return out
