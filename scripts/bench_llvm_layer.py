"""Benchmark: a hidden SIREN layer of the bank as one register-tiled LLVM IR kernel, against
MKL's batched product and the step's numba sine pass (issue 14's next candidate; not used by
the package yet).

The kernel computes, per block, ``z = w0 (W^T x)`` for ``W`` ``(h, h)`` and ``x`` ``(h, P)``
(``P`` a multiple of 16), optionally followed by the step's activation ``sin(z + w0 b)`` and
derivative ``w0 cos(z + w0 b)`` (the reduction and polynomials of :mod:`miner3d._fused`,
with its constants, in ``<16 x float>`` operations; without its final clamp to ``[-1, 1]``)
on the accumulators while they are in registers. A tile of ``--rows`` output rows by all
``P`` samples is held in vector registers, with an IR loop over the inputs (a fully
unrolled body let LLVM merge the tiles' loads and spill). It is built with llvmlite (which
numba brings), compiled for this CPU, and called per thread from a numba ``prange``.
Prints the median of ``--repeat`` calls over ``--blocks`` blocks, and the error against
double precision.

    python scripts/bench_llvm_layer.py
    python scripts/bench_llvm_layer.py --hidden 20 --points 64 --blocks 256 --rows 4
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from functools import partial

import llvmlite.binding as llvm
import numpy as np
import torch
from llvmlite import ir

from miner3d import _fused as F
from miner3d._numba import numba
from miner3d.fused import sin_cos
from miner3d.memory import tune_heap

F32, I64, I32 = ir.FloatType(), ir.IntType(64), ir.IntType(32)
V = ir.VectorType(F32, 16)


def build(h: int, points: int, rows: int, sine: bool) -> str:
    """IR of ``kern(W, x, out, start, stop, alpha, bias, deriv)`` over blocks ``start..stop``
    of row-major ``W`` ``(n, h, h)``, ``x``, ``out``, ``deriv`` ``(n, h, P)``, ``bias`` ``(n,
    1, h)``."""
    assert h % rows == 0 and points % 16 == 0
    mod = ir.Module(name="layer")
    mod.triple = llvm.get_process_triple()
    fma = ir.Function(mod, ir.FunctionType(V, [V, V, V]), name="llvm.fma.v16f32")
    floor = ir.Function(mod, ir.FunctionType(V, [V]), name="llvm.floor.v16f32")
    pf = F32.as_pointer()
    fn = ir.Function(
        mod, ir.FunctionType(ir.VoidType(), [pf, pf, pf, I64, I64, F32, pf, pf]), name="kern"
    )
    w_all, x_all, out_all, start, stop, alpha, bias_all, deriv_all = fn.args
    for a in (w_all, x_all, out_all, bias_all, deriv_all):
        a.add_attribute("noalias")
    entry, head = fn.append_basic_block("entry"), fn.append_basic_block("blocks")
    b = ir.IRBuilder(entry)

    def c64(v: int) -> ir.Constant:
        return ir.Constant(I64, v)

    def cv(v: float) -> ir.Constant:
        return ir.Constant(V, [float(np.float32(v))] * 16)

    def bcast(s: ir.Value) -> ir.Value:
        v = b.insert_element(ir.Constant(V, ir.Undefined), s, ir.Constant(I32, 0))
        zero = ir.Constant(ir.VectorType(I32, 16), [0] * 16)
        return b.shuffle_vector(v, ir.Constant(V, ir.Undefined), zero)

    def vptr(base: ir.Value, off: ir.Value) -> ir.Value:
        return b.bitcast(b.gep(base, [off]), V.as_pointer())

    def sincos(x: ir.Value) -> tuple[ir.Value, ir.Value]:  # miner3d._fused._sincos's steps
        q = b.call(floor, [b.call(fma, [x, cv(F._TWO_OVER_PI), cv(F._HALF)])])
        r = x
        for part in (F._P1, F._P2, F._P3):
            r = b.call(fma, [b.fneg(q), cv(part), r])
        r2 = b.fmul(r, r)
        ps, pc = cv(F._S4), cv(F._C5)
        for coef in (F._S3, F._S2, F._S1):
            ps = b.call(fma, [r2, ps, cv(coef)])
        for coef in (F._C4, F._C3, F._C2, F._C1):
            pc = b.call(fma, [r2, pc, cv(coef)])
        s = b.call(fma, [b.fmul(r, r2), ps, r])
        c = b.call(fma, [r2, pc, cv(1.0)])
        m = b.fsub(q, b.fmul(cv(4.0), b.call(floor, [b.fmul(q, cv(0.25))])))
        odd = b.or_(b.fcmp_ordered("==", m, cv(1.0)), b.fcmp_ordered("==", m, cv(3.0)))
        sn, cs = b.select(odd, c, s), b.select(odd, s, c)
        sn = b.select(b.fcmp_ordered(">=", m, cv(2.0)), b.fneg(sn), sn)
        flip = b.or_(b.fcmp_ordered("==", m, cv(1.0)), b.fcmp_ordered("==", m, cv(2.0)))
        return sn, b.select(flip, b.fneg(cs), cs)

    av = bcast(alpha)
    b.branch(head)
    b.position_at_end(head)
    i = b.phi(I64)
    i.add_incoming(start, entry)
    body, done = fn.append_basic_block("body"), fn.append_basic_block("done")
    b.cbranch(b.icmp_signed("<", i, stop), body, done)
    b.position_at_end(body)
    w = b.gep(w_all, [b.mul(i, c64(h * h))])
    x = b.gep(x_all, [b.mul(i, c64(h * points))])
    out = b.gep(out_all, [b.mul(i, c64(h * points))])
    deriv = b.gep(deriv_all, [b.mul(i, c64(h * points))])
    bias = b.gep(bias_all, [b.mul(i, c64(h))])
    vectors = range(points // 16)
    tiles, inputs, stores, tiles_end = (
        fn.append_basic_block(n) for n in "tiles k k_end t_end".split()
    )
    b.branch(tiles)
    b.position_at_end(tiles)
    m0 = b.phi(I64)
    m0.add_incoming(c64(0), body)
    b.branch(inputs)
    b.position_at_end(inputs)
    k = b.phi(I64)
    k.add_incoming(c64(0), tiles)
    acc = {}
    for r in range(rows):
        for v in vectors:
            acc[r, v] = b.phi(V)
            acc[r, v].add_incoming(cv(0.0), tiles)
    step = fn.append_basic_block("k_body")
    b.cbranch(b.icmp_signed("<", k, c64(h)), step, stores)
    b.position_at_end(step)
    xs = [b.load(vptr(x, b.add(b.mul(k, c64(points)), c64(16 * v))), align=4) for v in vectors]
    for r in range(rows):  # W^T: output row m0 + r, input k is W[k, m0 + r]
        wk = bcast(b.load(b.gep(w, [b.add(b.mul(k, c64(h)), b.add(m0, c64(r)))])))
        for v in vectors:
            acc[r, v].add_incoming(b.call(fma, [wk, xs[v], acc[r, v]]), step)
    k.add_incoming(b.add(k, c64(1)), step)
    b.branch(inputs)
    b.position_at_end(stores)
    for r in range(rows):
        row = b.add(m0, c64(r))
        bo = bcast(b.fmul(b.load(b.gep(bias, [row])), alpha)) if sine else None
        for v in vectors:
            off = b.add(b.mul(row, c64(points)), c64(16 * v))
            z = b.fmul(acc[r, v], av)
            if sine:
                s, c = sincos(b.fadd(z, bo))
                b.store(s, vptr(out, off), align=4)
                b.store(b.fmul(c, av), vptr(deriv, off), align=4)
            else:
                b.store(z, vptr(out, off), align=4)
    nxt = b.add(m0, c64(rows))
    m0.add_incoming(nxt, stores)
    b.cbranch(b.icmp_signed("<", nxt, c64(h)), tiles, tiles_end)
    b.position_at_end(tiles_end)
    i.add_incoming(b.add(i, c64(1)), tiles_end)
    b.branch(head)
    b.position_at_end(done)
    b.ret_void()
    return str(mod)


_ENGINES = []  # the compiled code lives as long as its engine


def compile_kernel(text: str):
    """The kernel of :func:`build`'s IR, compiled at -O3 for this CPU at full vector width."""
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    mod = llvm.parse_assembly(text)
    mod.verify()
    features = llvm.get_host_cpu_features().flatten() + ",-prefer-256-bit"
    tm = llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=features, opt=3
    )
    pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=3))
    pb.getModulePassManager().run(mod, pb)
    engine = llvm.create_mcjit_compiler(mod, tm)
    engine.finalize_object()
    _ENGINES.append(engine)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    proto = ctypes.CFUNCTYPE(None, p, p, p, i64, i64, ctypes.c_float, p, p)
    return proto(engine.get_function_address("kern"))


@numba.njit(parallel=True, nogil=True)
def _run(kern, w, x, out, alpha, bias, deriv, threads):  # pragma: no cover - numba
    n = w.shape[0]
    for t in numba.prange(threads):
        start, stop = t * n // threads, (t + 1) * n // threads
        kern(w.ctypes.data, x.ctypes.data, out.ctypes.data, start, stop, alpha, bias.ctypes.data,
             deriv.ctypes.data)  # fmt: skip


def median_us(f, repeat: int) -> float:
    f()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=20)
    parser.add_argument("--points", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=256)
    parser.add_argument("--rows", type=int, default=4, help="output rows a register tile")
    parser.add_argument("--repeat", type=int, default=100)
    args = parser.parse_args()
    tune_heap()
    h, points, n = args.hidden, args.points, args.blocks
    threads = torch.get_num_threads()
    g = np.random.default_rng(0)
    x = g.random((n, h, points), dtype=np.float32)
    w = g.random((n, h, h), dtype=np.float32) - np.float32(0.5)
    bias = g.random((n, 1, h), dtype=np.float32) - np.float32(0.5)
    out, deriv = np.empty_like(x), np.empty_like(x)
    z64 = 30 * np.einsum("bkp,bkm->bmp", x.astype(np.float64), w)
    xt, wt, bt = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias)
    zt = torch.empty(n, h, points)
    mkl = median_us(
        lambda: torch.baddbmm(zt, wt.transpose(1, 2), xt, beta=0, alpha=30.0), args.repeat
    )

    def mkl_sine() -> None:
        sin_cos(torch.baddbmm(zt, wt.transpose(1, 2), xt, beta=0, alpha=30.0), bt, 30.0, True)

    both = median_us(mkl_sine, args.repeat)
    print(f"# {n} blocks, {h} x {h} x {points}, {threads} threads, {args.rows} rows a tile")
    print(f"MKL baddbmm: {mkl:.1f} us; with the numba sine pass: {both:.1f} us")
    for sine in (False, True):
        t0 = time.perf_counter()
        kern = compile_kernel(build(h, points, args.rows, sine))
        seconds = time.perf_counter() - t0
        us = median_us(
            partial(_run, kern, w, x, out, np.float32(30.0), bias, deriv, threads), args.repeat
        )
        want = np.sin(z64 + 30 * bias.transpose(0, 2, 1)) if sine else z64
        err = float(np.abs(out - want).max() / max(1.0, float(np.abs(want).max())))
        what = "product, bias, sine and derivative" if sine else "product"
        against = both if sine else mkl
        print(
            f"LLVM IR kernel ({what}): {us:.1f} us ({against / us:.2f}x), error {err:.1e}, "
            f"compiled in {seconds:.2f} s"
        )


if __name__ == "__main__":
    main()
