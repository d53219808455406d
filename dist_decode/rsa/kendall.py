"""Exact Kendall tau-a / tau-b between RDM upper triangles, and fast exact permutation engines.

All engines return the integer numerator ``S = C - D`` (concordant minus discordant pairs of pairs), so
p-value counts are free of rounding; ``tau_a = S / P`` and ``tau_b = S / sqrt((P - x_tie) (P - y_tie))``
with ``P = m (m - 1) / 2`` pairs of the ``m`` RDM cells. Under a relabelling of subjects the multisets of
data and model values do not change, so ``P``, ``x_tie`` and ``y_tie`` are permutation invariant and only
``S`` has to be recomputed per permutation.

Two engines (see ``docs/rsa.md``):

* :class:`GradedEngine`, any model ``f(x_i, x_j)`` with ``K`` tie levels (``|x_i - x_j|`` for ages,
  PANSS...). The data cells are sorted once; per permutation one sweep in data order adds, for every cell
  at model level ``l``, ``#{earlier cells < l} + #{earlier cells <= l} - #{earlier cells}`` to ``S``.
  The sweep goes in words of 64 cells (numba kernel :func:`_graded_bitword4`): earlier words are
  summarised by per-level prefix counts ``Q`` (O(K) update per word), the cells inside a word by one
  64-bit mask per level and ``popcount``. Four permutations share one pass over the cell stream (their
  subject codes packed in one uint64, so one add gives the four table indices of a cell) and the
  per-word level scan runs on the four of them as one SIMD loop. That is O(m (1 + K/64)) per permutation,
  about 1.4-2 ns per cell on one Zen 4 core, for models with at most 256 distinct values and 512 levels.
  Other models (decimal ages: thousands to ``m`` levels, or more than 256 distinct values) use
  :func:`_graded_tree4`: the levels are packed into at most ``TREE_TOP`` top buckets that go through the
  same bit-word sweep (pairs in one bucket count as ties there), and the pairs inside a bucket are
  counted exactly per cell by a small tree of ``FAN``-ary uint16 prefix-count nodes (one vector update
  per cell and permutation up to 2,048 levels, two up to 65,536, three beyond): about 5 ns per cell at
  N = 470 (fixture ages, 33,717 levels), 6-12 ns at N = 1,250. Data RDMs with a few tied cells (at
  most one tied pair per cell) keep these kernels plus an exact correction over the tied pairs;
  more tied data use a flat prefix-array sweep (``K <= 64``) or a Fenwick tree.
* :class:`CategoricalEngine`, ``[g_i != g_j]`` models. With ``s_p = 2 midrank(d_p) - (m + 1)``
  (``s`` as an ``n x n`` matrix ``Sm``) ``S = -1/2 sum_g e_g' Sm e_g`` for the group indicators ``e_g``:
  one GEMM per group and block, exact because every partial sum is an integer (float32 while they stay
  below ``2**24``, i.e. up to about 320 subjects, float64 beyond).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import llvmlite.binding as llvm_binding
import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

#: Model levels up to which tied data use the flat (vectorised) prefix array instead of a Fenwick tree.
FLAT_LEVELS = 64
#: Model levels up to which the 64-cell bit-word kernel is used (its per-word cost grows with K).
BITWORD_LEVELS = 512
#: Data RDMs with at most this many tied pairs of cells per cell still use the bit-word and tree kernels
#: (which sweep tied cells as if they were not tied) plus an exact correction over the tied pairs
#: (:func:`_tie_correction`); more tied data use the tie-group sweeps.
TIED_PAIRS_PER_CELL = 1.0


# ------------------------------------------------------------------------------------------------
# numba kernels
# ------------------------------------------------------------------------------------------------
@intrinsic
def _popcount(typingctx, x):
    """LLVM ``ctpop`` on a uint64 (one ``popcnt`` instruction)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


#: Permutations processed together by :func:`_graded_bitword4` (one SIMD lane each in the level scan;
#: the kernel is written for 4).
LANES = 4


@intrinsic
def _scan_lanes(typingctx, mask, less, q, same, n_levels):
    """Level scan of one 64-cell word for ``LANES`` permutations at once (arrays laid out ``[level][lane]``).

    For every level ``u`` and lane: ``less[u] = OR_{v<u} mask[v]``, ``q[u] += 2 #{word cells < u} +
    #{word cells == u}`` (popcounts of the masks), ``same += sum_u popcount(mask[u])**2``; ``mask`` is
    zeroed. Emitted as one LLVM loop over ``<LANES x i64>`` vectors (``vpopcntq`` on AVX-512 hosts).
    """
    sig = types.int64(mask, less, q, same, types.intp)

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        i64 = ir.IntType(64)
        vt = ir.VectorType(i64, LANES)
        ptrs = [builder.bitcast(context.make_array(signature.args[k])(context, builder, args[k]).data,
                                i64.as_pointer()) for k in range(4)]
        name = f"llvm.ctpop.v{LANES}i64"
        ctpop = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(vt, [vt]),
                                                                name)
        zero = ir.Constant(vt, [0] * LANES)
        pre = builder.block
        loop = builder.function.append_basic_block("scan_lanes.loop")
        done = builder.function.append_basic_block("scan_lanes.done")
        builder.cbranch(builder.icmp_signed(">", args[4], ir.Constant(i64, 0)), loop, done)
        builder.position_at_end(loop)
        u = builder.phi(i64)
        run = builder.phi(vt)
        w = builder.phi(vt)
        sm = builder.phi(vt)
        off = builder.mul(u, ir.Constant(i64, LANES))
        pm, pl, pq = (builder.bitcast(builder.gep(p, [off]), vt.as_pointer()) for p in ptrs[:3])
        mv = builder.load(pm, align=8)
        builder.store(run, pl, align=8)
        builder.store(zero, pm, align=8)
        run2 = builder.or_(run, mv)
        pc = builder.call(ctpop, [mv])
        builder.store(builder.add(builder.load(pq, align=8), builder.add(builder.add(w, w), pc)), pq, align=8)
        w2 = builder.add(w, pc)
        sm2 = builder.add(sm, builder.mul(pc, pc))
        u2 = builder.add(u, ir.Constant(i64, 1))
        end = builder.block
        builder.cbranch(builder.icmp_signed("<", u2, args[4]), loop, done)
        u.add_incoming(ir.Constant(i64, 0), pre)
        u.add_incoming(u2, end)
        for phi, init, nxt in ((run, zero, run2), (w, zero, w2), (sm, zero, sm2)):
            phi.add_incoming(init, pre)
            phi.add_incoming(nxt, end)
        builder.position_at_end(done)
        tot = builder.phi(vt)
        tot.add_incoming(zero, pre)
        tot.add_incoming(sm2, end)
        ps = builder.bitcast(ptrs[3], vt.as_pointer())
        builder.store(builder.add(builder.load(ps, align=8), tot), ps, align=8)
        return ir.Constant(i64, 0)

    return sig, codegen


@numba.njit(cache=True, nogil=True)
def _graded_bitword4(ci: np.ndarray, cj: np.ndarray, codes: np.ndarray, table: np.ndarray, n_codes: int,
                     n_levels: int, out: np.ndarray) -> None:
    """As :func:`_graded_bitword`, four permutations per pass over the cell stream (data without ties).

    ``codes`` must have a multiple of 4 rows and ``n_codes <= 256``: the four permuted codes of a subject
    are packed as 16-bit fields of one uint64 (``a * n_codes`` for the row subject, ``c`` for the column
    subject), so one add of two packed words gives the four table indices of a cell. Per word of 64
    cells, the level scan runs on the four lanes at once (:func:`_scan_lanes`), and the same-level pairs
    of a word are counted in closed form (``sum_u C(#cells at u, 2)``), so the per-cell pass needs one
    ``popcount``: ``#{earlier < l} + #{earlier <= l} = 2 #{earlier < l} + #{earlier == l}``. The lookup
    of ``Q`` is moved behind the scan (``sum_t Q_before[l_t] = sum_t Q_after[l_t] - nk**2``), so the
    first pass only builds the masks. All indices are unsigned (numba adds no negative-index wraparound).
    """
    nperm = codes.shape[0]
    n = codes.shape[1]
    m = ci.shape[0]
    one = np.uint64(1)
    ffff = np.uint64(0xFFFF)
    s16 = np.uint64(16)
    s32 = np.uint64(32)
    s48 = np.uint64(48)
    two = np.uint64(2)
    three = np.uint64(3)
    mask = np.zeros(n_levels * 4, np.uint64)   # [level][lane]: cells of the current word at the level
    less = np.zeros(n_levels * 4, np.uint64)   # [level][lane]: cells of the current word below the level
    q = np.zeros(n_levels * 4, np.int64)       # [level][lane]: 2 #{earlier words < l} + #{== l}
    same = np.zeros(4, np.int64)
    buf = np.zeros(4 * 64, np.uint64)        # [lane][cell]: mask index of the cell (unsigned: no wraparound)
    pi = np.zeros(n, np.uint64)
    pj = np.zeros(n, np.uint64)
    nc = np.uint64(n_codes)
    for b in range(0, nperm, 4):
        for s in range(n):
            c0 = np.uint64(codes[b, s])
            c1 = np.uint64(codes[b + 1, s])
            c2 = np.uint64(codes[b + 2, s])
            c3 = np.uint64(codes[b + 3, s])
            pj[s] = c0 | (c1 << s16) | (c2 << s32) | (c3 << s48)
            pi[s] = (c0 * nc) | ((c1 * nc) << s16) | ((c2 * nc) << s32) | ((c3 * nc) << s48)
        q[:] = 0
        same[:] = 0
        acc0 = np.int64(0)
        acc1 = np.int64(0)
        acc2 = np.int64(0)
        acc3 = np.int64(0)
        for k0 in range(0, m, 64):
            nk = min(64, m - k0)
            bit = one
            # pass 1: levels of the word's cells, one bit per cell in the mask of its (level, lane)
            for t in range(nk):
                k = np.uint64(k0 + t)
                x = pi[ci[k]] + pj[cj[k]]
                l0 = np.uint64(table[x & ffff]) << two
                l1 = (np.uint64(table[(x >> s16) & ffff]) << two) | one
                l2 = (np.uint64(table[(x >> s32) & ffff]) << two) | two
                l3 = (np.uint64(table[x >> s48]) << two) | three
                buf[t] = l0
                buf[64 + t] = l1
                buf[128 + t] = l2
                buf[192 + t] = l3
                mask[l0] |= bit
                mask[l1] |= bit
                mask[l2] |= bit
                mask[l3] |= bit
                bit <<= one
            # scan; same += sum_u pc_u**2, and sum_u C(pc_u, 2) = (sum_u pc_u**2 - nk) / 2
            _scan_lanes(mask, less, q, same, n_levels)
            # pass 2: sum_t q_before[l_t] = sum_t q_after[l_t] - nk**2 (the word's own cells add nk**2)
            below = np.uint64(0)
            for t in range(nk):
                l0 = buf[t]
                l1 = buf[64 + t]
                l2 = buf[128 + t]
                l3 = buf[192 + t]
                acc0 += q[l0] + 2 * np.int64(_popcount(less[l0] & below))
                acc1 += q[l1] + 2 * np.int64(_popcount(less[l1] & below))
                acc2 += q[l2] + 2 * np.int64(_popcount(less[l2] & below))
                acc3 += q[l3] + 2 * np.int64(_popcount(less[l3] & below))
                below = (below << one) | one
            sq = nk * nk
            acc0 -= sq
            acc1 -= sq
            acc2 -= sq
            acc3 -= sq
        out[b] = acc0 + (same[0] - m) // 2
        out[b + 1] = acc1 + (same[1] - m) // 2
        out[b + 2] = acc2 + (same[2] - m) // 2
        out[b + 3] = acc3 + (same[3] - m) // 2


# ------------------------------------------------------------------------------------------------
# any number of levels and codes: bit-word top buckets + uint16 count trees (``_graded_tree4``)
# ------------------------------------------------------------------------------------------------
#: Fan-out of the count nodes below the top buckets of :func:`_graded_tree4`: a node is ``FAN`` uint16
#: prefix counts, 64 bytes (one AVX-512 vector, 64-byte aligned).
FAN_BITS = 5
FAN = 1 << FAN_BITS
#: Most top buckets :func:`_graded_tree4` sweeps with bit words when a model has more levels than that.
TREE_TOP = 64
#: Most cells a top bucket may hold below its last level (its count nodes are uint16).
TREE_CELLS = 65535
#: Whether :func:`_node_step` may use AVX-512BW ``vpermw`` (host compilation on a CPU that has it).
_VPERMW = bool(numba.core.config.CPU_NAME is None and llvm_binding.get_host_cpu_features().get("avx512bw"))


@intrinsic
def _node_step(typingctx, nodes, off, digit):
    """Query and update one count node: return ``nodes[off + digit]``, then ``nodes[off + u] += (u > digit)``.

    A node holds ``FAN`` uint16 counts ``#{earlier cells of its subtree in a child < u}``; ``off`` is a
    multiple of ``FAN`` (the node is one 64-byte aligned vector). The update is one ``<FAN x i16>``
    compare and add. On AVX-512BW hosts the query is taken from the loaded vector by ``vpermw`` (a scalar
    reload of a just-stored vector waits on store forwarding).
    """
    sig = types.uint64(nodes, types.uint64, types.uint64)

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        i16 = ir.IntType(16)
        i32 = ir.IntType(32)
        vt = ir.VectorType(i16, FAN)
        base = builder.bitcast(context.make_array(signature.args[0])(context, builder, args[0]).data,
                               i16.as_pointer())
        row = builder.gep(base, [args[1]])
        pv = builder.bitcast(row, vt.as_pointer())
        cur = builder.load(pv, align=64)
        undef = ir.Constant(vt, ir.Undefined)
        splat = builder.shuffle_vector(builder.insert_element(undef, builder.trunc(args[2], i16),
                                                              ir.Constant(i32, 0)),
                                       undef, ir.Constant(ir.VectorType(i32, FAN), [0] * FAN))
        if _VPERMW and FAN == 32:
            name = "llvm.x86.avx512.permvar.hi.512"
            fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(vt, [vt, vt]),
                                                                 name)
            q = builder.extract_element(builder.call(fn, [cur, splat]), ir.Constant(i32, 0))
        else:
            q = builder.load(builder.gep(row, [args[2]]), align=2)
        gt = builder.icmp_unsigned(">", ir.Constant(vt, list(range(FAN))), splat)
        builder.store(builder.add(cur, builder.zext(gt, vt)), pv, align=64)
        return builder.zext(q, ir.IntType(64))

    return sig, codegen


@numba.njit(cache=True, nogil=True, inline="always")
def _tree_fine(nodes: np.ndarray, base: np.uint64, off2: np.uint64, off3: np.uint64, depth: int,
               v: np.uint64) -> np.uint64:
    """``#{earlier cells of v's top bucket at a lower virtual level}`` (then ``v`` is counted in)."""
    fb = np.uint64(FAN_BITS)
    fm = np.uint64(FAN - 1)
    if depth == 1:
        return _node_step(nodes, (base + (v >> fb)) << fb, v & fm)
    if depth == 2:
        return (_node_step(nodes, (base + (v >> (fb + fb))) << fb, (v >> fb) & fm)
                + _node_step(nodes, (base + off2 + (v >> fb)) << fb, v & fm))
    if depth == 3:
        return (_node_step(nodes, (base + (v >> (fb * np.uint64(3)))) << fb, (v >> (fb + fb)) & fm)
                + _node_step(nodes, (base + off2 + (v >> (fb + fb))) << fb, (v >> fb) & fm)
                + _node_step(nodes, (base + off3 + (v >> fb)) << fb, v & fm))
    return np.uint64(0)


@numba.njit(cache=True, nogil=True)
def _graded_tree4(ci: np.ndarray, cj: np.ndarray, codes: np.ndarray, table: np.ndarray, n_codes: int,
                  n_top: int, depth: int, lane_nodes: int, nodes: np.ndarray, out: np.ndarray,
                  fine: np.ndarray, starts: np.ndarray, region: np.ndarray) -> None:
    """Four permutations per pass for a model with any number of levels and codes (data without ties).

    ``table[a * n_codes + c]`` is the *virtual level* ``v`` of a cell between codes ``a`` and ``c``
    (increasing with the model value): its top bucket ``v >> (FAN_BITS * depth)`` (``< n_top``) and
    ``depth`` digits of ``FAN_BITS`` bits. The top buckets go through the 64-cell bit-word sweep of
    :func:`_graded_bitword4` (``out[b] = sum_p #{earlier top < t_p} + #{earlier top <= t_p}``). Pairs of
    cells in one top bucket are counted per cell by a tree of ``FAN``-ary uint16 count nodes per top
    bucket, ``depth`` levels deep (``fine[b] = sum_p #{earlier cells of p's top bucket at a lower
    level}``). ``nodes`` holds ``4 * lane_nodes`` aligned nodes of ``FAN`` uint16 (zeroed here), the
    depth-1 nodes (one per top bucket) first, then the depth-2 and depth-3 nodes. Codes are packed as two
    32-bit fields per uint64, so any ``n_codes`` with ``n_codes**2 < 2**32`` works.

    With ``region`` (``4 * m`` uint16; ``starts``: the first cell of each top bucket in it, which does not
    depend on the permutation) the sweep only scatters each cell's digits into its lane's bucket region,
    in data order, and the trees run bucket by bucket after the sweep, on ``nodes`` sized for one bucket
    (``4 * (1 + FAN + FAN**2)`` nodes): for models with so many levels (``depth == 3``) that one tree per
    bucket of all four lanes would not stay in cache.
    """
    nperm = codes.shape[0]
    n = codes.shape[1]
    m = ci.shape[0]
    one = np.uint64(1)
    two = np.uint64(2)
    three = np.uint64(3)
    lo = np.uint64(0xFFFFFFFF)
    s32 = np.uint64(32)
    tsh = np.uint64(FAN_BITS * depth)
    ln = np.uint64(lane_nodes)
    off2 = np.uint64(n_top)
    off3 = np.uint64(n_top + n_top * FAN)
    mask = np.zeros(n_top * 4, np.uint64)
    less = np.zeros(n_top * 4, np.uint64)
    q = np.zeros(n_top * 4, np.int64)
    same = np.zeros(4, np.int64)
    buf = np.zeros(4 * 64, np.uint64)
    vb = np.zeros(4 * 64, np.uint64)       # [lane][cell]: virtual level of the cell
    regions = region.shape[0] > 1
    cur = np.zeros(4 * n_top, np.int64)    # [lane][bucket]: next free cell of the bucket's region
    un = np.uint64(n_top)
    dmask = np.uint64((1 << (FAN_BITS * depth)) - 1)
    bl = 1 + FAN + FAN * FAN               # nodes of one bucket's tree per lane (regions)
    pi01 = np.zeros(n, np.uint64)
    pi23 = np.zeros(n, np.uint64)
    pj01 = np.zeros(n, np.uint64)
    pj23 = np.zeros(n, np.uint64)
    nc = np.uint64(n_codes)
    for b in range(0, nperm, 4):
        for s in range(n):
            c0 = np.uint64(codes[b, s])
            c1 = np.uint64(codes[b + 1, s])
            c2 = np.uint64(codes[b + 2, s])
            c3 = np.uint64(codes[b + 3, s])
            pj01[s] = c0 | (c1 << s32)
            pj23[s] = c2 | (c3 << s32)
            pi01[s] = (c0 * nc) | ((c1 * nc) << s32)
            pi23[s] = (c2 * nc) | ((c3 * nc) << s32)
        q[:] = 0
        same[:] = 0
        if regions:
            for lane in range(4):
                for u in range(n_top):
                    cur[lane * n_top + u] = lane * m + starts[u]
        elif depth > 0:
            nodes[:] = 0
        acc0 = np.int64(0)
        acc1 = np.int64(0)
        acc2 = np.int64(0)
        acc3 = np.int64(0)
        f0 = np.uint64(0)
        f1 = np.uint64(0)
        f2 = np.uint64(0)
        f3 = np.uint64(0)
        for k0 in range(0, m, 64):
            nk = min(64, m - k0)
            bit = one
            # pass 1: virtual levels and top-bucket masks
            for t in range(nk):
                k = np.uint64(k0 + t)
                ia = ci[k]
                ib = cj[k]
                x01 = pi01[ia] + pj01[ib]
                x23 = pi23[ia] + pj23[ib]
                v0 = np.uint64(table[x01 & lo])
                v1 = np.uint64(table[x01 >> s32])
                v2 = np.uint64(table[x23 & lo])
                v3 = np.uint64(table[x23 >> s32])
                t0 = v0 >> tsh
                t1 = v1 >> tsh
                t2 = v2 >> tsh
                t3 = v3 >> tsh
                if regions:
                    p0 = cur[t0]
                    region[p0] = v0 & dmask
                    cur[t0] = p0 + 1
                    p1 = cur[t1 + un]
                    region[p1] = v1 & dmask
                    cur[t1 + un] = p1 + 1
                    p2 = cur[t2 + un * two]
                    region[p2] = v2 & dmask
                    cur[t2 + un * two] = p2 + 1
                    p3 = cur[t3 + un * three]
                    region[p3] = v3 & dmask
                    cur[t3 + un * three] = p3 + 1
                else:
                    vb[t] = v0
                    vb[64 + t] = v1
                    vb[128 + t] = v2
                    vb[192 + t] = v3
                l0 = t0 << two
                l1 = (t1 << two) | one
                l2 = (t2 << two) | two
                l3 = (t3 << two) | three
                buf[t] = l0
                buf[64 + t] = l1
                buf[128 + t] = l2
                buf[192 + t] = l3
                mask[l0] |= bit
                mask[l1] |= bit
                mask[l2] |= bit
                mask[l3] |= bit
                bit <<= one
            # fine counts, in a loop of their own (their node updates stall less there)
            if depth > 0 and not regions:
                for t in range(nk):
                    f0 += _tree_fine(nodes, np.uint64(0), off2, off3, depth, vb[t])
                    f1 += _tree_fine(nodes, ln, off2, off3, depth, vb[64 + t])
                    f2 += _tree_fine(nodes, ln * two, off2, off3, depth, vb[128 + t])
                    f3 += _tree_fine(nodes, ln * three, off2, off3, depth, vb[192 + t])
            _scan_lanes(mask, less, q, same, n_top)
            # pass 2 as in _graded_bitword4
            below = np.uint64(0)
            for t in range(nk):
                l0 = buf[t]
                l1 = buf[64 + t]
                l2 = buf[128 + t]
                l3 = buf[192 + t]
                acc0 += q[l0] + 2 * np.int64(_popcount(less[l0] & below))
                acc1 += q[l1] + 2 * np.int64(_popcount(less[l1] & below))
                acc2 += q[l2] + 2 * np.int64(_popcount(less[l2] & below))
                acc3 += q[l3] + 2 * np.int64(_popcount(less[l3] & below))
                below = (below << one) | one
            sq = nk * nk
            acc0 -= sq
            acc1 -= sq
            acc2 -= sq
            acc3 -= sq
        out[b] = acc0 + (same[0] - m) // 2
        out[b + 1] = acc1 + (same[1] - m) // 2
        out[b + 2] = acc2 + (same[2] - m) // 2
        out[b + 3] = acc3 + (same[3] - m) // 2
        if regions:
            # bucket by bucket, the four lanes' regions in lockstep (a bucket has as many cells in each)
            ubl = np.uint64(bl)
            boff2 = np.uint64(1)
            boff3 = np.uint64(1 + FAN)
            for u in range(n_top):
                a = starts[u]
                cnt = starts[u + 1] - a
                if cnt < 2:
                    continue
                nodes[:] = 0
                for x in range(a, a + cnt):
                    f0 += _tree_fine(nodes, np.uint64(0), boff2, boff3, depth, np.uint64(region[x]))
                    f1 += _tree_fine(nodes, ubl, boff2, boff3, depth, np.uint64(region[m + x]))
                    f2 += _tree_fine(nodes, ubl * two, boff2, boff3, depth, np.uint64(region[2 * m + x]))
                    f3 += _tree_fine(nodes, ubl * three, boff2, boff3, depth, np.uint64(region[3 * m + x]))
        fine[b] = np.int64(f0)
        fine[b + 1] = np.int64(f1)
        fine[b + 2] = np.int64(f2)
        fine[b + 3] = np.int64(f3)


@numba.njit(cache=True, nogil=True)
def _tie_correction(ci: np.ndarray, cj: np.ndarray, starts: np.ndarray, ends: np.ndarray, codes: np.ndarray,
                    table: np.ndarray, n_codes: int, out: np.ndarray) -> None:
    """``sum_p sum_{a <= k < l < e} sgn(level_l - level_k)`` over the data tie groups ``[a, e)`` (size >= 2).

    The bit-word and tree kernels sweep tied data cells in their stable sorted order, as if they were
    not tied; this is what that adds to ``S`` (``O(sum_g C(size_g, 2))`` per permutation).
    """
    nperm = codes.shape[0]
    size = 0
    for g in range(starts.shape[0]):
        size = max(size, ends[g] - starts[g])
    buf = np.zeros(size, np.int64)
    for b in range(nperm):
        row = codes[b]
        c = 0
        for g in range(starts.shape[0]):
            a = starts[g]
            e = ends[g]
            for k in range(a, e):
                buf[k - a] = table[np.int64(row[ci[k]]) * n_codes + np.int64(row[cj[k]])]
            for x in range(e - a):
                lx = buf[x]
                for y in range(x + 1, e - a):
                    c += np.int64(buf[y] > lx) - np.int64(buf[y] < lx)
        out[b] = c


@numba.njit(cache=True)
def _pack_levels(counts: np.ndarray, cap_levels: int, cap_cells: int) -> tuple[np.ndarray, int]:
    """Virtual level of each level (in order) and the number of top buckets.

    Levels fill a top bucket in order until it holds ``cap_levels`` levels or more than ``cap_cells``
    cells would lie below its last level; level ``l`` gets ``bucket * cap_levels + position``.
    """
    k = counts.shape[0]
    vmap = np.empty(k, np.int64)
    t = 0
    pos = 0
    cells = 0
    for lv in range(k):
        if pos > 0 and (pos == cap_levels or cells > cap_cells):
            t += 1
            pos = 0
            cells = 0
        vmap[lv] = t * cap_levels + pos
        pos += 1
        cells += counts[lv]
    return vmap, t + 1


@numba.njit(cache=True, nogil=True)
def _sweep_counts(order_groups: np.ndarray, levels: np.ndarray, n_levels: int) -> int:
    """S of one (data, model) pair: sweep data tie groups in order, Fenwick tree over model levels.

    ``order_groups`` holds ``[g0, g1, ...]`` starts of data tie groups in data-sorted order (plus the end);
    ``levels`` are the model levels of the cells in data-sorted order.
    """
    tree = np.zeros(n_levels + 1, np.int64)
    cnt = np.zeros(n_levels, np.int64)
    s = 0
    seen = 0
    for g in range(order_groups.shape[0] - 1):
        a = order_groups[g]
        b = order_groups[g + 1]
        for k in range(a, b):
            lv = levels[k]
            # prefix(lv - 1) = number of seen cells with a smaller level
            i = lv
            less = 0
            while i > 0:
                less += tree[i]
                i -= i & (-i)
            s += 2 * less + cnt[lv] - seen
        for k in range(a, b):
            lv = levels[k]
            cnt[lv] += 1
            i = lv + 1
            while i <= n_levels:
                tree[i] += 1
                i += i & (-i)
        seen += b - a
    return s


@numba.njit(cache=True, nogil=True)
def _graded_flat(ci: np.ndarray, cj: np.ndarray, groups: np.ndarray, codes: np.ndarray,
                 table: np.ndarray, n_codes: int, out: np.ndarray) -> None:
    """``sum_p Q[l_p]`` per permutation for data with tied cells and ``K <= FLAT_LEVELS`` levels.

    ``groups`` are the starts of the data tie groups: all cells of a group are queried before any of
    them is inserted, so tied data cells never count each other. ``Q`` is a flat array updated with
    branch-free vector adds.
    """
    nperm = codes.shape[0]
    ngroups = groups.shape[0] - 1
    q = np.zeros(FLAT_LEVELS, np.int32)
    for b in range(nperm):
        row = codes[b]
        q[:] = 0
        acc = np.int64(0)
        for g in range(ngroups):
            a = groups[g]
            e = groups[g + 1]
            for k in range(a, e):
                acc += q[table[row[ci[k]] * n_codes + row[cj[k]]]]
            for k in range(a, e):
                lv = table[row[ci[k]] * n_codes + row[cj[k]]]
                for u in range(FLAT_LEVELS):
                    q[u] += np.int32(u > lv) + np.int32(u >= lv)
        out[b] = acc


@numba.njit(cache=True, nogil=True)
def _graded_fenwick(ci: np.ndarray, cj: np.ndarray, groups: np.ndarray, codes: np.ndarray,
                    table: np.ndarray, n_codes: int, n_levels: int, out: np.ndarray) -> None:
    """As :func:`_graded_flat` for any number of levels, with a Fenwick tree of counts per permutation."""
    nperm = codes.shape[0]
    ngroups = groups.shape[0] - 1
    tree = np.zeros(n_levels + 1, np.int32)
    cnt = np.zeros(n_levels, np.int32)
    for b in range(nperm):
        row = codes[b]
        tree[:] = 0
        cnt[:] = 0
        acc = 0
        for g in range(ngroups):
            a = groups[g]
            e = groups[g + 1]
            for k in range(a, e):
                l = table[row[ci[k]] * n_codes + row[cj[k]]]
                i = l
                less = 0
                while i > 0:
                    less += tree[i]
                    i -= i & (-i)
                acc += 2 * less + cnt[l]
            for k in range(a, e):
                l = table[row[ci[k]] * n_codes + row[cj[k]]]
                cnt[l] += 1
                i = l + 1
                while i <= n_levels:
                    tree[i] += 1
                    i += i & (-i)
        out[b] = acc


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def dense_rank(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense ranks ``0..K-1`` of ``values`` (equal values share a rank) and the number of levels ``K``."""
    uniq, inv = np.unique(np.asarray(values), return_inverse=True)
    return inv.reshape(-1).astype(np.int64), int(uniq.size)


def tie_pairs(values: np.ndarray) -> int:
    """Number of pairs of entries of ``values`` that are tied."""
    _, counts = np.unique(np.asarray(values), return_counts=True)
    counts = counts.astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def _aligned_zeros(size: int, align: int = 64) -> np.ndarray:
    """Zeroed uint16 array of ``size`` elements starting on an ``align``-byte boundary."""
    raw = np.zeros(size + align // 2, np.uint16)
    off = (-raw.ctypes.data % align) // 2
    return raw[off:off + size]


def _data_order(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable data-sorted order of the cells and the starts of its tie groups (plus the end)."""
    order = np.argsort(data, kind="mergesort")
    sd = data[order]
    starts = np.flatnonzero(np.r_[True, sd[1:] != sd[:-1]])
    return order, np.r_[starts, sd.size].astype(np.int64)


def _seen_constant(groups: np.ndarray) -> int:
    """``sum_p #seen_p``: cells of strictly lower data tie groups, summed over all cells (invariant)."""
    sizes = np.diff(groups)
    return int((sizes * groups[:-1]).sum())


@dataclass(frozen=True)
class TauResult:
    """Exact Kendall statistics of two vectors."""

    s: int
    """Concordant minus discordant pairs."""
    n_pairs: int
    """``P = m (m - 1) / 2``."""
    x_ties: int
    y_ties: int

    @property
    def tau_a(self) -> float:
        return self.s / self.n_pairs if self.n_pairs else math.nan

    @property
    def tau_b(self) -> float:
        den = math.sqrt(float(self.n_pairs - self.x_ties) * float(self.n_pairs - self.y_ties))
        return self.s / den if den > 0 else math.nan


def kendall(x: np.ndarray, y: np.ndarray) -> TauResult:
    """Exact Kendall statistics of two equally long vectors in O(m log m).

    Parameters
    ----------
    x, y : array_like, shape (m,)
        Finite values (e.g. data and model RDM upper triangles).

    Returns
    -------
    TauResult
        ``s``, ``n_pairs``, ``x_ties``, ``y_ties`` and the derived ``tau_a`` / ``tau_b``.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y).ravel()
    if x.shape != y.shape:
        raise ValueError(f"kendall: vectors differ in length ({x.size} vs {y.size})")
    if not (np.isfinite(x).all() and np.isfinite(np.asarray(y, dtype=np.float64)).all()):
        raise ValueError("kendall: vectors must be finite (drop missing subjects first)")
    m = x.size
    order, groups = _data_order(x)
    levels, k = dense_rank(y)
    s = _sweep_counts(groups, levels[order], max(k, 1))
    return TauResult(int(s), m * (m - 1) // 2, tie_pairs(x), tie_pairs(y))


def tau_a(x: np.ndarray, y: np.ndarray) -> float:
    """Exact Kendall tau-a of two vectors (ties count as neither concordant nor discordant)."""
    return kendall(x, y).tau_a


def tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Exact Kendall tau-b of two vectors (equals ``scipy.stats.kendalltau``'s default)."""
    return kendall(x, y).tau_b


def upper_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of the cells of the condensed upper triangle (``scipy.spatial.distance.pdist`` order)."""
    return np.triu_indices(n, k=1)


def model_vector(values: np.ndarray, kind: str) -> np.ndarray:
    """Condensed model RDM of one variable: ``|x_i - x_j|`` (continuous) or ``[g_i != g_j]`` (categorical)."""
    i, j = upper_pairs(len(values))
    values = np.asarray(values)
    if kind == "continuous":
        v = values.astype(np.float64)
        return np.abs(v[i] - v[j])
    if kind == "categorical":
        return (values[i] != values[j]).astype(np.float64)
    raise ValueError(f"unknown model kind {kind!r}; expected 'continuous' or 'categorical'")


# ------------------------------------------------------------------------------------------------
# engines
# ------------------------------------------------------------------------------------------------
class GradedEngine:
    """Exact tau numerators of one data RDM against a subject-permuted model RDM (any model, ties allowed).

    Parameters
    ----------
    data : ndarray, shape (m,)
        Condensed data RDM over ``n`` subjects (``m = n (n - 1) / 2``, pdist order).
    values : ndarray, shape (n,)
        The model variable per subject.
    kind : {"continuous", "categorical"}
        Model RDM ``|x_i - x_j|`` or ``[x_i != x_j]``.
    """

    def __init__(self, data: np.ndarray, values: np.ndarray, kind: str) -> None:
        data = np.asarray(data, dtype=np.float64)
        values = np.asarray(values)
        n = values.shape[0]
        if data.shape != (n * (n - 1) // 2,):
            raise ValueError(f"data RDM has {data.shape} cells; {n} subjects need {n * (n - 1) // 2}")
        uniq, codes = np.unique(values, return_inverse=True)
        u = uniq.size
        # small code dtypes keep the permuted code rows in L1
        cdt = np.uint8 if u <= 256 else (np.uint16 if u <= 65536 else np.int32)
        self.codes = codes.reshape(-1).astype(cdt)
        # model value between every pair of distinct codes, computed exactly as model_vector does
        if kind == "continuous":
            uv = uniq.astype(np.float64)
            diff = np.abs(uv[:, None] - uv[None, :])
        elif kind == "categorical":
            diff = (np.arange(u)[:, None] != np.arange(u)[None, :]).astype(np.float64)
        else:
            raise ValueError(f"unknown model kind {kind!r}; expected 'continuous' or 'categorical'")
        lv, self.n_levels = dense_rank(diff.ravel())
        k = self.n_levels
        self.n_codes = u
        order, self.groups = _data_order(data)
        i, j = upper_pairs(n)
        idx_dtype = np.uint16 if n < 2**16 else np.int32
        self.ci = i[order].astype(idx_dtype)
        self.cj = j[order].astype(idx_dtype)
        self.const = _seen_constant(self.groups)
        self.m = data.size
        self.n = n
        self.n_pairs = data.size * (data.size - 1) // 2
        self.x_ties = tie_pairs(data)
        self.y_ties = tie_pairs(model_vector(values, kind))
        self.correction = 0
        self.tie_starts = self.tie_ends = None
        if self.groups.size != self.m + 1 and self.x_ties > TIED_PAIRS_PER_CELL * self.m:
            self.kernel = "flat" if k <= FLAT_LEVELS else "fenwick"
        elif u <= 256 and k <= BITWORD_LEVELS:
            self.kernel = "bitword4"
        else:
            self.kernel = "tree4"
        if self.groups.size != self.m + 1 and self.kernel in ("bitword4", "tree4"):
            # few tied data cells: sweep them as if untied, then take out what their pairs added
            sizes = np.diff(self.groups)
            self.tie_starts = self.groups[:-1][sizes > 1]
            self.tie_ends = self.groups[1:][sizes > 1]
            self.const = self.m * (self.m - 1) // 2
        if self.kernel != "tree4":
            self.table = lv.astype(np.uint8 if k <= 256 else (np.uint16 if k <= 65536 else np.int32))
            return
        # tree4: virtual levels (top bucket, FAN_BITS-bit digits), packed in level order
        counts = np.bincount(lv[codes[i] * u + codes[j]], minlength=k).astype(np.int64)
        if k <= BITWORD_LEVELS:
            depth, vmap, n_top = 0, np.arange(k, dtype=np.int64), k
        else:
            for depth in (1, 2, 3):
                vmap, n_top = _pack_levels(counts, FAN ** depth, TREE_CELLS)
                if n_top <= TREE_TOP:
                    break
        self.depth = depth
        self.n_top = int(n_top)
        self.lane_nodes = sum(self.n_top * FAN ** e for e in range(depth))
        vmax = int(vmap[-1])
        self.table = vmap[lv].astype(np.uint16 if vmax < 2**16 else np.uint32)
        top_cells = np.bincount(vmap >> (FAN_BITS * depth), weights=counts, minlength=self.n_top)
        top_cells = np.rint(top_cells).astype(np.int64)
        # depth 3 (more than 65,536 levels): trees bucket by bucket over regions (cache-sized trees)
        self.regions = depth == 3
        self.starts = np.r_[0, np.cumsum(top_cells)].astype(np.int64)
        # the bit-word sweep counts pairs in one top bucket as ties; the trees count them exactly
        self.correction = int((top_cells * (top_cells - 1) // 2).sum()) - self.y_ties

    def statistics(self, perms: np.ndarray) -> np.ndarray:
        """``S`` for every row of ``perms`` (shape (B, n); row ``p`` gives model ``M[p[i], p[j]]``)."""
        perms = np.atleast_2d(perms)
        codes = np.ascontiguousarray(self.codes[perms])
        out = np.empty(codes.shape[0], np.int64)
        if self.kernel in ("bitword4", "tree4"):
            # four permutations per pass: pad the block to a multiple of 4 with copies of its last row
            b = codes.shape[0]
            pad = (-b) % 4
            if pad:
                codes = np.concatenate([codes, np.repeat(codes[-1:], pad, axis=0)])
            full = np.empty(b + pad, np.int64)
            if self.kernel == "bitword4":
                _graded_bitword4(self.ci, self.cj, codes, self.table, self.n_codes, self.n_levels, full)
            else:
                fine = np.zeros(b + pad, np.int64)
                if self.regions:
                    nodes = _aligned_zeros(4 * (1 + FAN + FAN * FAN) * FAN)
                    region = np.empty(4 * self.m, np.uint16)
                else:
                    nodes = _aligned_zeros(max(4 * self.lane_nodes * FAN, FAN))
                    region = np.empty(1, np.uint16)
                _graded_tree4(self.ci, self.cj, codes, self.table, self.n_codes, self.n_top, self.depth,
                              self.lane_nodes, nodes, full, fine, self.starts, region)
                full += 2 * fine
            out[:] = full[:b]
            if self.tie_starts is not None:
                tied = np.empty(b, np.int64)
                _tie_correction(self.ci, self.cj, self.tie_starts, self.tie_ends, codes[:b], self.table,
                                self.n_codes, tied)
                out -= tied
        elif self.kernel == "flat":
            _graded_flat(self.ci, self.cj, self.groups, codes, self.table, self.n_codes, out)
        else:
            _graded_fenwick(self.ci, self.cj, self.groups, codes, self.table, self.n_codes,
                            self.n_levels, out)
        return out - self.const - self.correction


class CategoricalEngine:
    """Exact tau numerators for a same/different model ``[g_i != g_j]`` via rank sums and GEMM.

    Parameters
    ----------
    data : ndarray, shape (m,)
        Condensed data RDM over ``n`` subjects.
    groups : ndarray, shape (n,)
        Group label per subject (any hashable dtype).
    """

    def __init__(self, data: np.ndarray, groups: np.ndarray) -> None:
        data = np.asarray(data, dtype=np.float64)
        groups = np.asarray(groups)
        n = groups.shape[0]
        m = data.size
        if data.shape != (n * (n - 1) // 2,):
            raise ValueError(f"data RDM has {data.shape} cells; {n} subjects need {n * (n - 1) // 2}")
        # 2 * midrank - (m + 1) = sum_q sgn(d_p - d_q): integer even with ties
        from scipy.stats import rankdata

        s = (2.0 * rankdata(data, method="average") - (m + 1)).astype(np.float64)
        sm = np.zeros((n, n))
        i, j = upper_pairs(n)
        sm[i, j] = s
        sm[j, i] = s
        uniq, codes = np.unique(groups, return_inverse=True)
        self.codes = codes.reshape(-1).astype(np.int32)
        self.n_groups = uniq.size
        # float32 GEMMs are exact while every partial sum of e @ Sm is an integer below 2**24
        dt = np.float32 if n * max(m - 1, 1) < 2**24 else np.float64
        self.sm = sm.astype(dt)
        self.onehot = [(self.codes == g).astype(dt) for g in range(self.n_groups)]
        self.rowsum = sm.sum(axis=1)
        self.n = n
        self.n_pairs = m * (m - 1) // 2
        self.x_ties = tie_pairs(data)
        self.y_ties = tie_pairs(model_vector(groups, "categorical"))

    def statistics(self, perms: np.ndarray) -> np.ndarray:
        """``S`` for every row of ``perms`` (shape (B, n))."""
        perms = np.atleast_2d(perms)
        out = np.empty(perms.shape[0], np.int64)
        # chunks keep the (chunk, n) operands in L2
        step = max(16, (1 << 17) // max(self.n, 1))
        for a in range(0, perms.shape[0], step):
            out[a:a + step] = self._chunk(perms[a:a + step])
        return out

    def _chunk(self, perms: np.ndarray) -> np.ndarray:
        if self.n_groups == 2:
            # S = r'e - e'Sm e for the indicator e of group 1 (1'Sm 1 = 0): one GEMM per block
            e = self.onehot[1][perms]  # (B, n)
            y = e @ self.sm
            quad = np.einsum("bi,bi->b", y, e, dtype=np.float64)
            return np.rint(e.astype(np.float64) @ self.rowsum - quad).astype(np.int64)
        total = np.zeros(perms.shape[0])
        for g in range(self.n_groups):
            e = self.onehot[g][perms]
            total += np.einsum("bi,bi->b", e @ self.sm, e, dtype=np.float64)
        return np.rint(-0.5 * total).astype(np.int64)


def make_engine(data: np.ndarray, values: np.ndarray, kind: str) -> GradedEngine | CategoricalEngine:
    """The fastest exact engine for a model: GEMM rank sums for categorical models with few groups."""
    if kind == "categorical" and np.unique(np.asarray(values)).size <= 8:
        return CategoricalEngine(data, values)
    return GradedEngine(data, values, kind)
