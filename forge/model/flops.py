"""Model FLOPs per training token, counted from the spec (MFU: forge train's perf/mfu and the benchmarks).

torch's FLOP counter does not see attention on CPU (SDPA there is not counted), so MFU is computed from
this analytic count; benchmarks/bench_roofline.py cross-checks its matmul part against torch's counter.
"""
from __future__ import annotations

from forge.model.window import AttentionPattern
from forge.spec.model import ModelSpec


def mean_attended_keys(spec: ModelSpec, seq_len: int) -> float:
    """Keys per query under the attention pattern (the causal window, global tokens included), averaged."""
    att = spec.attention
    pattern = AttentionPattern(att.type, att.sw_window, att.global_every, att.global_tokens)
    return float(pattern.mask(seq_len).sum()) / seq_len


def model_flops_per_token(spec: ModelSpec, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (forward + backward = 3 x forward, the memory's exceptions below) of each
    component, from the spec alone.
    A matmul of a token's d_in vector by a d_in x d_out weight is 2 d_in d_out FLOPs; "attention" is q.k and
    p.v over the keys each query attends to, 2 x 2 x keys x d per attention call (backbone and refiner)."""
    d, keys = spec.d_model, mean_attended_keys(spec, seq_len)

    def block(ffn_hidden: int) -> float:          # q, k, v, o and the SwiGLU's three matrices
        return 2 * 4 * d * d + 2 * 3 * d * ffn_hidden

    fwd = {"backbone": spec.n_layers * block(spec.ffn_hidden), "attention": spec.n_layers * 2 * 2 * keys * d,
           "memory": 0.0, "gate": 0.0, "trm": 0.0, "lm_head": 2 * d * spec.vocab_size}
    memory_adjust = 0.0   # the memory's terms that are not 3 x forward (below)
    if spec.memory.enabled:
        mem = spec.memory
        m = mem.d_mem
        # per token the scan reads M(q), recalls M(k), forms the weight gradients of its chunk's loss and (mlp)
        # backpropagates the recall error below the last layer
        if mem.variant == "mlp":
            dims = [m] + [mem.expansion * m] * (mem.depth - 1) + [m]
            weights = sum(a * b for a, b in zip(dims, dims[1:]))
            read = recall = grads = 2 * weights
            error = 2 * (weights - dims[0] * dims[1])
        else:
            read = recall = grads = 2 * m * m
            error = 0
        write = recall + grads + error
        fwd["memory"] = 2 * 4 * d * m + read + write      # + the q, k, v, out projections
        fwd["memory"] += 2 * 3 * m * mem.conv_kernel + (2 * 2 * d if mem.gates == "data_dependent" else 0)
        # The last chunk's write gives weights nothing reads: autograd runs no backward through it (2 x its
        # forward, for the last chunk's tokens). The memory/effective_decay observation repeats the gradient
        # formula without gradient (forward only). Left out: the factorized linear memory's M_0 = W1 W2, once
        # per batch (2 d_mem^2 rank, under 0.1% of the tiny step at batch 1).
        chunks = -(-seq_len // mem.chunk_size)
        last_share = (seq_len - (chunks - 1) * mem.chunk_size) / seq_len
        memory_adjust = (grads + error) - 2 * write * last_share
        fwd["gate"] = 2 * (2 * d * spec.gate.hidden + spec.gate.hidden * d)
    if spec.trm.enabled:
        calls = spec.trm.t_max * (spec.trm.micro_steps + 1) * spec.trm.n_layers   # the refiner's blocks run
        fwd["trm"] = calls * block(spec.trm.ffn_hidden) + spec.trm.t_max * 2 * d    # + the ACT head
        fwd["attention"] += calls * 2 * 2 * keys * d
        fwd["lm_head"] *= spec.trm.t_max                             # deep supervision decodes every step
    out = {k: 3 * v for k, v in fwd.items()}
    out["memory"] += memory_adjust
    out["total"] = sum(out.values())
    return out
