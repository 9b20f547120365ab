"""Pure-PyTorch selective scan (Mamba-1 SSM) that is fast on CPU and memory-lean.

Why this exists: without the mamba-ssm CUDA kernels, transformers falls back to a
sequential loop whose autograd graph stores several ``(B, D, L, N)`` tensors and whose
backward grows quadratically with ``L`` (docs/architecture.md, "Facts that bite"). Here the recurrence

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,     y_t = C_t . h_t + D * u_t

runs chunk by chunk inside a custom ``autograd.Function``:

* forward keeps only the state at each chunk boundary (``(K, B, N, D)``, K = L / T) and
  time-major copies of dt and u (O(B*D*L)); under ``no_grad`` not even those;
* backward walks the chunks in reverse, recomputes the chunk's decays and states from the
  stored boundary state, runs the adjoint recurrence and reduces every gradient at once
  with batched matmuls, so no ``(B, D, L, N)`` tensor ever exists;
* inside a chunk all ``(T, B, N, D)`` work (decays, inputs, contractions) is one op each;
  only the 1-step state update loops in Python, as one in-place ``addcmul_`` per step.

Numerics: every exponent is ``dt * A`` for a single step (<= 0 for the usual dt >= 0,
A <= 0), so nothing like ``exp(-cumsum)`` can overflow on long sequences or large
``dt * A``; decays only multiply. ``exp2`` with ``A * log2(e)`` is used because it is ~3x
faster than ``exp`` on CPU. Work is fp32 (fp64 if any input is fp64); outputs are returned
in the input dtype, the final state in the compute dtype (as the reference does).

The internal layout is time-major with ``D`` innermost, ``(T, B, N, D)``: every reduction
(over N for ``y``, over D for the B/C gradients) then becomes a fast gemv over a contiguous
axis, and elementwise ops vectorise along D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["selective_scan", "selective_scan_ref", "default_chunk_size"]

_LOG2E = 1.4426950408889634


def default_chunk_size(seq_len: int, width: int, state_size: int) -> int:
    """Chunk length T: big enough to amortise per-op overhead, small enough that the three
    ``(T, B, N, D)`` work buffers stay cache-friendly."""
    per_step = max(1, width * state_size)
    t = 393216 // per_step  # 1.5 MB of fp32 per buffer; measured best 16 (d=1536) to 32 (d=512)
    return int(min(max(t, 8), 32, max(seq_len, 1)))


def _time_major(x, cd):
    """(B, X, L) -> fresh contiguous (L, B, X) in dtype cd (one transposing copy)."""
    out = torch.empty(x.shape[2], x.shape[0], x.shape[1], dtype=cd, device=x.device)
    return out.copy_(x.permute(2, 0, 1))


def _chunk_states(dt_c, w_c, b_c, a2, h0, a_buf, h_buf):
    """Decays a (T, B, N, D) and states h (T, B, N, D) of one chunk, started from h0 (B, N, D)."""
    T = dt_c.shape[0]
    a = torch.mul(dt_c[:, :, None, :], a2, out=a_buf[:T]).exp2_()  # (T, B, N, D), <= 1
    h = torch.mul(b_c[:, :, :, None], w_c[:, :, None, :], out=h_buf[:T])  # dt * B * u
    hs, As = h.unbind(0), a.unbind(0)  # per-step views, created in one call
    hs[0].addcmul_(As[0], h0)
    for t in range(1, T):
        hs[t].addcmul_(As[t], hs[t - 1])
    return a, h


def _scan_fwd(dt_t, u_t, b_t, c_t, a2, T, keep_states):
    """Chunked forward. Returns y (L, B, D) = C . h and the states entering each chunk
    (K + 1, B, N, D), the last entry being the final state; without ``keep_states``
    (no backward will run) only two rotating states (2, B, N, D), the final one last."""
    L, Bsz, Dd = dt_t.shape
    N = a2.shape[0]
    K = (L + T - 1) // T
    states = dt_t.new_zeros(K + 1 if keep_states else 2, Bsz, N, Dd)
    y_t = dt_t.new_empty(L, Bsz, Dd)
    a_buf, h_buf = dt_t.new_empty(T, Bsz, N, Dd), dt_t.new_empty(T, Bsz, N, Dd)
    for k in range(K):
        s, e = k * T, min(L, (k + 1) * T)
        TB = (e - s) * Bsz
        w_c = dt_t[s:e] * u_t[s:e]  # (T, B, D)
        i, j = (k, k + 1) if keep_states else ((K - k + 1) % 2, (K - k) % 2)  # ends on states[1]
        _, h = _chunk_states(dt_t[s:e], w_c, b_t[s:e], a2, states[i], a_buf, h_buf)
        torch.bmm(c_t[s:e].view(TB, 1, N), h.view(TB, N, Dd), out=y_t[s:e].view(TB, 1, Dd))
        states[j].copy_(h[-1])
    return y_t, states


def _scan_bwd(dt_t, u_t, b_t, c_t, a2, A_nd, states, gy_t, carry, T, want_y):
    """Chunked backward, last chunk first, recomputing each chunk from its entry state.

    gy_t (L, B, D) is dLoss/dy; carry (B, N, D) is dLoss/d(final state). Returns the
    gradients w.r.t. w = dt*u (L, B, D), dt through the decays (L, B, D), B and C (L, B, N),
    A^T (N, D), and y (L, B, D) recomputed when ``want_y`` (needed for dLoss/dz)."""
    L, Bsz, Dd = dt_t.shape
    N = a2.shape[0]
    g_w, g_dtq = dt_t.new_empty(L, Bsz, Dd), dt_t.new_empty(L, Bsz, Dd)
    g_b, g_c = dt_t.new_empty(L, Bsz, N), dt_t.new_empty(L, Bsz, N)
    g_a = dt_t.new_zeros(N, Dd)
    y_t = dt_t.new_empty(L, Bsz, Dd) if want_y else None
    a_buf, h_buf, l_buf = (dt_t.new_empty(T, Bsz, N, Dd) for _ in range(3))
    for k in reversed(range(states.shape[0])):
        s, e = k * T, min(L, (k + 1) * T)
        TB = (e - s) * Bsz
        h0 = states[k]
        w_c = dt_t[s:e] * u_t[s:e]  # (T, B, D)
        a, h = _chunk_states(dt_t[s:e], w_c, b_t[s:e], a2, h0, a_buf, h_buf)
        hT = h.view(TB, N, Dd).transpose(1, 2)  # (TB, D, N) view: bmm with D reduced is fast
        if y_t is not None:
            torch.bmm(c_t[s:e].view(TB, 1, N), h.view(TB, N, Dd), out=y_t[s:e].view(TB, 1, Dd))
        gy = gy_t[s:e]  # (T, B, D)
        torch.bmm(gy.view(TB, 1, Dd), hT, out=g_c[s:e].view(TB, 1, N))
        # Adjoint lam_t = dLoss/dh_t = C_t * gy_t + a_{t+1} * lam_{t+1}   (T, B, N, D)
        lam = torch.mul(c_t[s:e, :, :, None], gy[:, :, None, :], out=l_buf[: e - s])
        lam[-1].add_(carry)
        ls, As = lam.unbind(0), a.unbind(0)
        for t in range(e - s - 2, -1, -1):
            ls[t].addcmul_(As[t + 1], ls[t + 1])
        carry = a[0] * lam[0]
        lamT = lam.view(TB, N, Dd).transpose(1, 2)  # (TB, D, N)
        torch.bmm(w_c.view(TB, 1, Dd), lamT, out=g_b[s:e].view(TB, 1, N))
        torch.bmm(b_t[s:e].view(TB, 1, N), lam.view(TB, N, Dd), out=g_w[s:e].view(TB, 1, Dd))
        q = a.mul_(lam)  # lam_t * a_t * h_{t-1} = dLoss/d(log a_t)
        q[1:].mul_(h[:-1])
        q[0].mul_(h0)
        g_a.add_(torch.mul(q, dt_t[s:e, :, None, :], out=lam).sum((0, 1)))
        torch.sum(q.mul_(A_nd), dim=2, out=g_dtq[s:e])
    return g_w, g_dtq, g_b, g_c, g_a, y_t


class _SelectiveScanFn(torch.autograd.Function):
    """All O(B*D*L) work is done time-major. The output is a contiguous (B, D, L) tensor like
    the reference's; input gradients are returned as (B, D, L) views of time-major storage
    (autograd accepts any strides), which saves a transposing copy per gradient."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, need_grad):
        cd = torch.float64 if torch.float64 in (u.dtype, delta.dtype, A.dtype) else torch.float32
        Bsz, Dd, L = u.shape
        T = chunk or default_chunk_size(L, Bsz * Dd, A.shape[1])
        dt_t = _time_major(delta, cd)  # (L, B, D)
        if delta_bias is not None:
            dt_t += delta_bias.to(cd)
        if delta_softplus:
            dt_t = F.softplus(dt_t)
        u_t = _time_major(u, cd)  # (L, B, D)
        b_t, c_t = _time_major(B, cd), _time_major(C, cd)  # (L, B, N)
        a2 = (A.to(cd) * _LOG2E).t().contiguous()  # (N, D)
        y_t, states = _scan_fwd(dt_t, u_t, b_t, c_t, a2, T, need_grad)  # (L, B, D)
        if D is not None:
            y_t.addcmul_(u_t, D.to(cd))
        if need_grad:
            ctx.save_for_backward(dt_t, u_t, A, B, C, D, z, states[:-1])
        del dt_t, u_t  # without a backward, free them before the output copy
        if z is not None:
            y_t.mul_(F.silu(_time_major(z, cd), inplace=True))
        bias_dtype = None if delta_bias is None else delta_bias.dtype
        ctx.cfg = (delta_softplus, T, cd, u.dtype, delta.dtype, bias_dtype)
        ctx.set_materialize_grads(False)
        last = states[-1].transpose(1, 2).contiguous()  # (B, D, N)
        out = torch.empty(Bsz, Dd, L, dtype=u.dtype, device=u.device).copy_(y_t.permute(1, 2, 0))
        return out, last

    @staticmethod
    def backward(ctx, g_out, g_last):
        dt_t, u_t, A, B, C, D, z, states = ctx.saved_tensors
        delta_softplus, T, cd, u_dtype, delta_dtype, bias_dtype = ctx.cfg
        L, Bsz, Dd = u_t.shape
        N = A.shape[1]
        g_out_t = u_t.new_zeros(L, Bsz, Dd) if g_out is None else _time_major(g_out, cd)
        gy_t = g_out_t  # dLoss/d(y + D u), (L, B, D)
        if z is not None:
            z_t = _time_major(z, cd)
            sig = torch.sigmoid(z_t)
            gy_t = g_out_t * z_t * sig
        carry = g_last.to(cd).transpose(1, 2) if g_last is not None else u_t.new_zeros(Bsz, N, Dd)
        b_t, c_t = _time_major(B, cd), _time_major(C, cd)
        a2 = (A.to(cd) * _LOG2E).t().contiguous()
        want_y = z is not None and ctx.needs_input_grad[6]
        g_w, g_dt, g_b, g_c, g_a, y_t = _scan_bwd(
            dt_t, u_t, b_t, c_t, a2, A.to(cd).t().contiguous(), states, gy_t, carry, T, want_y
        )
        g_u = g_w * dt_t  # (L, B, D)
        g_dt.addcmul_(g_w, u_t)
        g_D = g_z = g_bias = None
        if D is not None:
            g_u.addcmul_(gy_t, D.to(cd))
            if ctx.needs_input_grad[5]:
                g_D = (gy_t * u_t).sum((0, 1)).to(D.dtype)
        if want_y:  # d silu(z)/dz = sig * (1 + z * (1 - sig))
            if D is not None:
                y_t.addcmul_(u_t, D.to(cd))
            dsilu = torch.rsub(sig, 1).mul_(z_t).add_(1).mul_(sig)
            g_z = y_t.mul_(g_out_t).mul_(dsilu).to(z.dtype).permute(1, 2, 0)
        if delta_softplus:  # d softplus(x)/dx = sigmoid(x) = 1 - exp(-softplus(x))
            g_dt.mul_(torch.expm1(-dt_t).neg_())
        if bias_dtype is not None and ctx.needs_input_grad[7]:
            g_bias = g_dt.sum((0, 1)).to(bias_dtype)
        return (
            g_u.to(u_dtype).permute(1, 2, 0),
            g_dt.to(delta_dtype).permute(1, 2, 0),
            g_a.t().to(A.dtype),
            g_b.to(B.dtype).permute(1, 2, 0),
            g_c.to(C.dtype).permute(1, 2, 0),
            g_D,
            g_z,
            g_bias,
            None,
            None,
            None,
        )


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, chunk_size=None
):
    """Selective scan with the semantics of mamba-ssm's ``selective_scan_fn``.

    Shapes: u, delta, z (B, D, L); A (D, N); B, C (B, N, L); D, delta_bias (D,).
    Returns ``out`` (B, D, L) in u's dtype, and with ``return_last_state`` also the final
    state (B, D, N) in the compute dtype (fp32, or fp64 for fp64 inputs). ``chunk_size``
    overrides :func:`default_chunk_size` (tests use it to hit odd chunk boundaries).
    """
    if B.dim() != 3 or C.dim() != 3:
        raise ValueError("selective_scan supports input-dependent B and C of shape (B, N, L) only")
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out, last = _SelectiveScanFn.apply(*tensors, bool(delta_softplus), chunk_size, need_grad)
    return (out, last) if return_last_state else out


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Plain sequential reference (autograd-differentiable, fp64-capable) used by the tests."""
    dtype_in = u.dtype
    cd = torch.float64 if torch.float64 in (u.dtype, delta.dtype, A.dtype) else torch.float32
    u, delta, A, B, C = (t.to(cd) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(cd)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (B, D, N)
    ys = []
    for i in range(u.shape[2]):
        dA = torch.exp(delta[:, :, i, None] * A)  # (B, D, N)
        dBu = delta[:, :, i, None] * B[:, None, :, i] * u[:, :, i, None]  # (B, D, N)
        x = dA * x + dBu
        ys.append((x * C[:, None, :, i]).sum(-1))  # (B, D)
    out = torch.stack(ys, dim=-1)  # (B, D, L)
    if D is not None:
        out = out + u * D.to(cd)[:, None]
    if z is not None:
        out = out * F.silu(z.to(cd))
    out = out.to(dtype_in)
    return (out, x) if return_last_state else out
