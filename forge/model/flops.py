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
    """Training FLOPs per token (forward + backward = 3 x forward) of each component, from the spec alone.
    A matmul of a token's d_in vector by a d_in x d_out weight is 2 d_in d_out FLOPs; "attention" is q.k and
    p.v over the keys each query attends to, 2 x 2 x keys x d per attention call (backbone and refiner)."""
    d, keys = spec.d_model, mean_attended_keys(spec, seq_len)

    def block(ffn_hidden: int) -> float:          # q, k, v, o and the SwiGLU's three matrices
        return 2 * 4 * d * d + 2 * 3 * d * ffn_hidden

    fwd = {"backbone": spec.n_layers * block(spec.ffn_hidden), "attention": spec.n_layers * 2 * 2 * keys * d,
           "memory": 0.0, "gate": 0.0, "trm": 0.0, "lm_head": 2 * d * spec.vocab_size}
    if spec.memory.enabled:
        mem = spec.memory
        m = mem.d_mem
        # q, k, v, out projections; per token the scan reads M q, recalls M k and adds its k outer product
        fwd["memory"] = 2 * 4 * d * m + 3 * 2 * m * m
        if mem.variant == "mlp":   # read, recall, the weight gradients, the error backpropagated below layer L..2
            dims = [m] + [mem.expansion * m] * (mem.depth - 1) + [m]
            weights = sum(a * b for a, b in zip(dims, dims[1:]))
            fwd["memory"] = 2 * 4 * d * m + 3 * 2 * weights + 2 * (weights - dims[0] * dims[1])
        fwd["memory"] += 2 * 3 * m * mem.conv_kernel + (2 * 2 * d if mem.gates == "data_dependent" else 0)
        fwd["gate"] = 2 * (2 * d * spec.gate.hidden + spec.gate.hidden * d)
    if spec.trm.enabled:
        calls = spec.trm.t_max * (spec.trm.micro_steps + 1) * spec.trm.n_layers   # the refiner's blocks run
        fwd["trm"] = calls * block(spec.trm.ffn_hidden) + spec.trm.t_max * 2 * d    # + the ACT head
        fwd["attention"] += calls * 2 * 2 * keys * d
        fwd["lm_head"] *= spec.trm.t_max                             # deep supervision decodes every step
    out = {k: 3 * v for k, v in fwd.items()}
    out["total"] = sum(out.values())
    return out
