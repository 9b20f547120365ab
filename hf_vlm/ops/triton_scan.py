"""Triton selective scan (Mamba-1) for CUDA GPUs that have no mamba-ssm kernels.

Why: on a GPU without mamba-ssm (Windows, new CUDA releases) our chunked torch scan still issues
one small op per time step, about 10^5 tiny kernels per training step of a 64-layer model. Here a
whole layer is two kernels: one program per (batch row, block of channels) keeps the fp32 state
``(BLOCK_D, N)`` in registers and walks the sequence in chunks of ``BLOCK_L`` steps; inside a chunk
the recurrence ``h_t = a_t * h_{t-1} + x_t`` (``a_t = exp(dt_t A)``, ``x_t = dt_t B_t u_t``) is
one ``tl.associative_scan`` over time, so every input is read once per pass.

* forward stores only the state entering each chunk (``(B, K, D, N)`` fp32, K = L / BLOCK_L), or
  nothing under ``no_grad``, plus the final state (the generation cache);
* backward walks the chunks last to first, recomputes the chunk's states from its entry state,
  runs the adjoint ``lam_t = C_t gy_t + a_{t+1} lam_{t+1}`` as a reverse scan and reduces every
  gradient on the spot; B/C gradients (shared by all channels) are summed with fp32 atomics, so
  they are not bit-reproducible run to run (mamba-ssm does the same).

Numerics: the scan only multiplies decays ``a <= 1`` (for dt >= 0, A <= 0) and never forms
``exp(-cumsum)``, so long sequences and large ``dt * A`` cannot overflow. State and arithmetic are
fp32 for fp16/bf16/fp32 inputs; fp64 is refused (use :func:`hf_vlm.ops.selective_scan`).

Not here: the one-token decode step. transformers runs it through `mamba_selective_state_update`,
which the ladder does not route; ``benchmarks/bench_gpu.py`` measures how much of a token's time
that torch update takes, i.e. the most a fused decode kernel could save.

Needs ``triton`` (Linux; ``pip install triton-windows`` on Windows) and CUDA tensors. CI checks it
on CPU through the Triton interpreter (``TRITON_INTERPRET=1`` before this module is imported).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .selective_scan import _LOG2E

__all__ = ["DEFAULT_CHUNK", "selective_scan"]

DEFAULT_CHUNK = 32  # time steps per scan tile (one per lane of a warp); also the spacing of saved states
DEFAULT_BLOCK_D = 8  # channels per program (one warp each) when not autotuned
LOG2E = tl.constexpr(_LOG2E)
AUTOTUNE_ENV = "HF_VLM_TRITON_AUTOTUNE"


# The kernels use only triton.language builtins: tl.sum, tl.sigmoid and tl.zeros are @triton.jit
# helpers of triton's standard library, decorated when triton is first imported (torch imports it),
# so they could not run in a kernel interpreted later in the same process (the CPU tests).
@triton.jit
def _linear_combine(a_left, x_left, a_right, x_right):
    """Compose h -> a_left*h + x_left, then h -> a_right*h + x_right."""
    return a_left * a_right, x_left * a_right + x_right


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _add)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _softplus(x):
    """log(1 + e^x) like torch (linear above 20), log1p by Kahan's trick (no libdevice needed)."""
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    exact = w == 1.0  # e below half an ulp of 1: log1p(e) = e
    log1p = tl.where(exact, e, tl.log(w) * (e / tl.where(exact, 1.0, w - 1.0)))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def _load_dt(ptr, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(raw, dt): delta + bias before softplus, and the step size (0 where masked)."""
    raw = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias[:, None]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return raw, tl.where(mask, dt, 0.0)


@triton.jit
def _scan_fwd_kernel(
    u_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    states_ptr,
    last_ptr,
    dim,
    dstate,
    seqlen,
    n_chunks,
    s_u_b,
    s_u_d,
    s_u_l,
    s_dt_b,
    s_dt_d,
    s_dt_l,
    s_A_d,
    s_A_n,
    s_B_b,
    s_B_n,
    s_B_l,
    s_C_b,
    s_C_n,
    s_C_l,
    s_z_b,
    s_z_d,
    s_z_l,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    STORE_STATES: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    # Tiles are (N, D, L): with BLOCK_D * BLOCK_L = threads, Triton's default layout gives each
    # thread all N states of one (channel, step), so sums over N stay inside a thread and
    # (D, L) tensors are not replicated; the scan over L runs across the lanes of a warp.
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    mask_d, mask_n = offs_d < dim, offs_n < dstate
    mask_nd = mask_n[:, None] & mask_d[None, :]
    A2 = tl.load(A_ptr + offs_n[:, None] * s_A_n + offs_d[None, :] * s_A_d, mask=mask_nd, other=0.0)
    A2 = A2.to(tl.float32) * LOG2E  # (BN, BD): exp(dt*A) = exp2(dt*A2)
    bias = tl.full([BLOCK_D], 0.0, tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.full([BLOCK_D], 0.0, tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    nd_offs = offs_d[None, :] * dstate + offs_n[:, None]  # (BN, BD) in a contiguous (D, N) state
    h = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    for k in range(n_chunks):
        t = k * BLOCK_L + offs_l
        mask_t = t < seqlen
        m_dl = mask_d[:, None] & mask_t[None, :]  # (BD, BL)
        m_nl = mask_n[:, None] & mask_t[None, :]  # (BN, BL)
        if STORE_STATES:  # the state entering chunk k, for the backward recompute
            tl.store(states_ptr + (b * n_chunks + k) * dim * dstate + nd_offs, h, mask=mask_nd)
        u = tl.load(u_ptr + b * s_u_b + offs_d[:, None] * s_u_d + t[None, :] * s_u_l, mask=m_dl, other=0.0)
        u = u.to(tl.float32)
        _, dt = _load_dt(
            dt_ptr + b * s_dt_b + offs_d[:, None] * s_dt_d + t[None, :] * s_dt_l, m_dl, bias, HAS_BIAS, SOFTPLUS
        )
        Bt = tl.load(B_ptr + b * s_B_b + offs_n[:, None] * s_B_n + t[None, :] * s_B_l, mask=m_nl, other=0.0)
        Ct = tl.load(C_ptr + b * s_C_b + offs_n[:, None] * s_C_n + t[None, :] * s_C_l, mask=m_nl, other=0.0)
        a = tl.exp2(A2[:, :, None] * dt[None, :, :])  # (BN, BD, BL); 1 where masked
        x = Bt.to(tl.float32)[:, None, :] * (dt * u)[None, :, :]  # 0 where masked
        a_cum, x_cum = tl.associative_scan((a, x), axis=2, combine_fn=_linear_combine)
        hs = a_cum * h[:, :, None] + x_cum  # states h_t of the chunk
        y = _sum(hs * Ct.to(tl.float32)[:, None, :], 0)  # (BD, BL)
        h = _sum(tl.where(offs_l[None, None, :] == BLOCK_L - 1, hs, 0.0), 2)  # padding keeps h
        if HAS_D:
            y += u * Dv[:, None]
        if HAS_Z:
            zt = tl.load(z_ptr + b * s_z_b + offs_d[:, None] * s_z_d + t[None, :] * s_z_l, mask=m_dl, other=0.0)
            zt = zt.to(tl.float32)
            y = y * zt * _sigmoid(zt)
        out_offs = (b * dim + offs_d[:, None]) * seqlen + t[None, :]
        tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=m_dl)
    tl.store(last_ptr + b * dim * dstate + nd_offs, h, mask=mask_nd)


@triton.jit
def _scan_bwd_kernel(
    u_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    states_ptr,
    gout_ptr,
    glast_ptr,
    gu_ptr,
    gdt_ptr,
    gA_ptr,
    gB_ptr,
    gC_ptr,
    gD_ptr,
    gz_ptr,
    gbias_ptr,
    dim,
    dstate,
    seqlen,
    n_chunks,
    s_u_b,
    s_u_d,
    s_u_l,
    s_dt_b,
    s_dt_d,
    s_dt_l,
    s_A_d,
    s_A_n,
    s_B_b,
    s_B_n,
    s_B_l,
    s_C_b,
    s_C_n,
    s_C_l,
    s_z_b,
    s_z_d,
    s_z_l,
    s_g_b,
    s_g_d,
    s_g_l,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_GLAST: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    mask_d, mask_n = offs_d < dim, offs_n < dstate
    mask_nd = mask_n[:, None] & mask_d[None, :]
    A = tl.load(A_ptr + offs_n[:, None] * s_A_n + offs_d[None, :] * s_A_d, mask=mask_nd, other=0.0)
    A = A.to(tl.float32)  # (BN, BD)
    A2 = A * LOG2E
    bias = tl.full([BLOCK_D], 0.0, tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.full([BLOCK_D], 0.0, tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    nd_offs = offs_d[None, :] * dstate + offs_n[:, None]
    lam_next = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)  # dLoss/dh at the first step of the next chunk
    if HAS_GLAST:
        lam_next = tl.load(glast_ptr + b * dim * dstate + nd_offs, mask=mask_nd, other=0.0).to(tl.float32)
    g_A = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    g_D = tl.full([BLOCK_D], 0.0, tl.float32)
    g_bias = tl.full([BLOCK_D], 0.0, tl.float32)
    for kk in range(n_chunks):
        k = n_chunks - 1 - kk
        t = k * BLOCK_L + offs_l
        mask_t = t < seqlen
        m_dl = mask_d[:, None] & mask_t[None, :]
        m_nl = mask_n[:, None] & mask_t[None, :]
        # recompute the chunk's states from the stored entry state
        h0 = tl.load(states_ptr + (b * n_chunks + k) * dim * dstate + nd_offs, mask=mask_nd, other=0.0)
        dt_offs = b * s_dt_b + offs_d[:, None] * s_dt_d + t[None, :] * s_dt_l
        raw, dt = _load_dt(dt_ptr + dt_offs, m_dl, bias, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_ptr + b * s_u_b + offs_d[:, None] * s_u_d + t[None, :] * s_u_l, mask=m_dl, other=0.0)
        w = dt * u.to(tl.float32)
        Bt = tl.load(B_ptr + b * s_B_b + offs_n[:, None] * s_B_n + t[None, :] * s_B_l, mask=m_nl, other=0.0)
        Bt = Bt.to(tl.float32)
        x = Bt[:, None, :] * w[None, :, :]
        a_cum, x_cum = tl.associative_scan(
            (tl.exp2(A2[:, :, None] * dt[None, :, :]), x), axis=2, combine_fn=_linear_combine
        )
        hs = a_cum * h0[:, :, None] + x_cum  # (BN, BD, BL)
        ah = hs - x  # a_t * h_{t-1}
        # adjoint, last step first: lam_t = C_t gy_t + a_{t+1} lam_{t+1}; step t+1's decay is 1
        # past the end (the final state's gradient enters as lam_next of the last chunk)
        g_out = tl.load(gout_ptr + b * s_g_b + offs_d[:, None] * s_g_d + t[None, :] * s_g_l, mask=m_dl, other=0.0)
        g_out = g_out.to(tl.float32)
        gy = g_out  # dLoss/d(C.h + D u)
        if HAS_Z:
            zt = tl.load(z_ptr + b * s_z_b + offs_d[:, None] * s_z_d + t[None, :] * s_z_l, mask=m_dl, other=0.0)
            zt = zt.to(tl.float32)
            sig = _sigmoid(zt)
            gy = g_out * zt * sig
        m_next = mask_d[:, None] & (t[None, :] + 1 < seqlen)
        _, dt_next = _load_dt(dt_ptr + dt_offs + s_dt_l, m_next, bias, HAS_BIAS, SOFTPLUS)
        Ct = tl.load(C_ptr + b * s_C_b + offs_n[:, None] * s_C_n + t[None, :] * s_C_l, mask=m_nl, other=0.0)
        Ct = Ct.to(tl.float32)
        c_cum, g_cum = tl.associative_scan(
            (tl.exp2(A2[:, :, None] * dt_next[None, :, :]), Ct[:, None, :] * gy[None, :, :]),
            axis=2,
            combine_fn=_linear_combine,
            reverse=True,
        )
        lam = c_cum * lam_next[:, :, None] + g_cum  # (BN, BD, BL)
        lam_next = _sum(tl.where(offs_l[None, None, :] == 0, lam, 0.0), 2)
        # B and C are shared by all channels: reduce this block's share, add it atomically
        n_l_offs = b * dstate * seqlen + offs_n[:, None] * seqlen + t[None, :]
        tl.atomic_add(gC_ptr + n_l_offs, _sum(hs * gy[None, :, :], 1), mask=m_nl, sem="relaxed")
        tl.atomic_add(gB_ptr + n_l_offs, _sum(lam * w[None, :, :], 1), mask=m_nl, sem="relaxed")
        g_w = _sum(lam * Bt[:, None, :], 0)  # dLoss/d(dt*u), (BD, BL)
        q = lam * ah  # dLoss/d(log a_t)
        g_A += _sum(q * dt[None, :, :], 2)
        g_dt = _sum(q * A[:, :, None], 0)
        u = u.to(tl.float32)
        g_dt += g_w * u
        g_u = g_w * dt
        if HAS_D:
            g_u += gy * Dv[:, None]
            g_D += _sum(gy * u, 1)
        if HAS_Z:  # d silu(z)/dz = sig * (1 + z * (1 - sig))
            y = _sum(hs * Ct[:, None, :], 0) + u * Dv[:, None]
            g_z = g_out * y * sig * (1.0 + zt * (1.0 - sig))
            tl.store(
                gz_ptr + (b * dim + offs_d[:, None]) * seqlen + t[None, :], g_z.to(gz_ptr.dtype.element_ty), mask=m_dl
            )
        if SOFTPLUS:
            g_dt = g_dt * _sigmoid(raw)
        g_dt = tl.where(m_dl, g_dt, 0.0)
        g_bias += _sum(g_dt, 1)
        out_offs = (b * dim + offs_d[:, None]) * seqlen + t[None, :]
        tl.store(gu_ptr + out_offs, g_u.to(gu_ptr.dtype.element_ty), mask=m_dl)
        tl.store(gdt_ptr + out_offs, g_dt.to(gdt_ptr.dtype.element_ty), mask=m_dl)
    tl.store(gA_ptr + b * dim * dstate + nd_offs, g_A, mask=mask_nd)
    tl.store(gD_ptr + b * dim + offs_d, g_D, mask=mask_d)
    tl.store(gbias_ptr + b * dim + offs_d, g_bias, mask=mask_d)


def _autotuned(kernel, reset_to_zero=None):
    """The kernel with BLOCK_D (= warps: one warp per channel, lanes along the 32 steps) picked
    per (dim, dstate, BLOCK_N, BLOCK_L) on its first call. Larger blocks spill registers."""
    configs = [triton.Config({"BLOCK_D": bd}, num_warps=bd) for bd in (2, 4, 8)]
    return triton.autotune(configs, key=["dim", "dstate", "BLOCK_N", "BLOCK_L"], reset_to_zero=reset_to_zero)(kernel)


_fwd_tuned = _autotuned(_scan_fwd_kernel)
_bwd_tuned = _autotuned(_scan_bwd_kernel, reset_to_zero=["gB_ptr", "gC_ptr"])


def _interpreted() -> bool:
    return not isinstance(_scan_fwd_kernel, triton.runtime.JITFunction)


def _launch(kernel, tuned, rows, dim, block_d, args, meta):
    """Run `kernel` with a fixed BLOCK_D, or its autotuned twin on CUDA when no block is given."""
    if _interpreted():
        block_d = block_d or min(8, triton.next_power_of_2(dim))
        kernel[(triton.cdiv(dim, block_d), rows)](*args, **meta, BLOCK_D=block_d)
        return
    meta = dict(meta, enable_fp_fusion=True)  # explicit: triton 3.9 warns when left to its default
    if block_d is None and os.environ.get(AUTOTUNE_ENV, "1") != "0":
        tuned[lambda m: (triton.cdiv(dim, m["BLOCK_D"]), rows)](*args, **meta)
        return
    block_d = block_d or DEFAULT_BLOCK_D
    kernel[(triton.cdiv(dim, block_d), rows)](*args, **meta, BLOCK_D=block_d, num_warps=min(8, block_d))


def _strides(t, n=3):
    return (0,) * n if t is None else tuple(t.stride())


class _TritonScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, block_d, need_grad):
        batch, dim, seqlen = u.shape
        dstate = A.shape[1]
        n_chunks = triton.cdiv(seqlen, chunk)
        out = torch.empty(batch, dim, seqlen, dtype=u.dtype, device=u.device)
        last = torch.empty(batch, dim, dstate, dtype=torch.float32, device=u.device)
        states = torch.empty(batch, n_chunks, dim, dstate, dtype=torch.float32, device=u.device) if need_grad else None
        flags = dict(
            HAS_D=D is not None,
            HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus),
            BLOCK_N=triton.next_power_of_2(dstate),
            BLOCK_L=chunk,
        )
        args = (
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias,
            out,
            states,
            last,
            dim,
            dstate,
            seqlen,
            n_chunks,
            *u.stride(),
            *delta.stride(),
            *A.stride(),
            *B.stride(),
            *C.stride(),
            *_strides(z),
        )
        _launch(_scan_fwd_kernel, _fwd_tuned, batch, dim, block_d, args, dict(flags, STORE_STATES=need_grad))
        if need_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
            ctx.cfg = (flags, block_d)
        return out, last

    @staticmethod
    def backward(ctx, g_out, g_last):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        flags, block_d = ctx.cfg
        batch, dim, seqlen = u.shape
        dstate = A.shape[1]
        if g_out is None:
            g_out = torch.zeros_like(u)
        f32 = dict(dtype=torch.float32, device=u.device)
        g_u = torch.empty(u.shape, dtype=u.dtype, device=u.device)  # contiguous (B, D, L), as the kernel writes
        g_dt = torch.empty(u.shape, dtype=delta.dtype, device=u.device)
        g_z = torch.empty(u.shape, dtype=z.dtype, device=u.device) if z is not None else None
        g_B, g_C = torch.zeros(batch, dstate, seqlen, **f32), torch.zeros(batch, dstate, seqlen, **f32)
        g_A = torch.empty(batch, dim, dstate, **f32)  # per batch row; summed below
        g_D, g_bias = torch.empty(batch, dim, **f32), torch.empty(batch, dim, **f32)
        g_last = None if g_last is None else g_last.contiguous()
        args = (
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias,
            states,
            g_out,
            g_last,
            g_u,
            g_dt,
            g_A,
            g_B,
            g_C,
            g_D,
            g_z,
            g_bias,
            dim,
            dstate,
            seqlen,
            states.shape[1],
            *u.stride(),
            *delta.stride(),
            *A.stride(),
            *B.stride(),
            *C.stride(),
            *_strides(z),
            *g_out.stride(),
        )
        _launch(_scan_bwd_kernel, _bwd_tuned, batch, dim, block_d, args, dict(flags, HAS_GLAST=g_last is not None))
        need = ctx.needs_input_grad
        return (
            g_u,
            g_dt,
            g_A.sum(0).to(A.dtype),
            g_B.to(B.dtype),
            g_C.to(C.dtype),
            g_D.sum(0).to(D.dtype) if D is not None and need[5] else None,
            g_z if need[6] else None,
            g_bias.sum(0).to(delta_bias.dtype) if delta_bias is not None and need[7] else None,
            None,
            None,
            None,
            None,
        )


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    chunk_size=None,
    *,
    block_d=None,
):
    """Selective scan with the semantics of mamba-ssm's ``selective_scan_fn`` (and of
    :func:`hf_vlm.ops.selective_scan`), as two Triton kernels.

    Shapes: u, delta, z (B, D, L); A (D, N); B, C (B, N, L); D, delta_bias (D,). Any strides.
    Returns ``out`` (B, D, L) in u's dtype, and with ``return_last_state`` also the final state
    (B, D, N) in fp32. ``chunk_size`` (a power of two, default 32) is the time tile; ``block_d``
    fixes the channels per program (default: autotuned on CUDA, unless HF_VLM_TRITON_AUTOTUNE=0).
    """
    if B.dim() != 3 or C.dim() != 3:
        raise ValueError("the Triton selective scan supports input-dependent B and C of shape (B, N, L) only")
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        raise TypeError("the Triton selective scan computes in fp32; use hf_vlm.ops.selective_scan for fp64")
    chunk = DEFAULT_CHUNK if chunk_size is None else int(chunk_size)
    if chunk < 2 or chunk & (chunk - 1):
        raise ValueError(f"chunk_size must be a power of two >= 2, got {chunk_size}")
    if u.device.type != "cuda" and not _interpreted():
        raise RuntimeError(
            f"the Triton selective scan needs CUDA tensors (got {u.device}); "
            "set TRITON_INTERPRET=1 before importing it to run on CPU (tests only)"
        )
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out, last = _TritonScanFn.apply(*tensors, bool(delta_softplus), chunk, block_d, need_grad)
    return (out, last) if return_last_state else out
