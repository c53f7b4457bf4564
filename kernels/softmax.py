"""Online softmax: the one update step of the flash-attention loops (prefill and decode).

Scores arrive already in the log2 domain (scale * log2(e) folded into q.k, LOG2E applied to any
additive bias), so the update uses exp2. Rows that have seen no visible key keep m = -inf, l = 0
and acc = 0.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)


@triton.jit
def online_softmax_step(acc, m_i, l_i, s, v_ptrs, v_mask, DOT_PRECISION: tl.constexpr):
    """Fold one block of scores s [M, N] (masked keys at -inf) and its values (loaded from v_ptrs
    [N, BLOCK_D] under v_mask, 0 elsewhere) into the running max m_i [M], sum l_i [M] and fp32
    accumulator acc [M, BLOCK_D]; returns the new (acc, m_i, l_i)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row that has seen no visible key keeps m = -inf: subtract 0 instead (exp2(-inf) = 0)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=v_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i
