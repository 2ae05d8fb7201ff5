"""Pre-flight memory estimate (B1, the OOM branch of the debugging tree): a training step's peak memory,
predicted before the first step from the spec alone, and the spec changes that would make it fit.

The estimate is the model's own arithmetic (`estimate`, well under a millisecond): bytes of the weights, the gradients and
the optimizer's state (Muon momentum, AdamW's two moments, the Grokfast EMA, and the non-finite guard's kept
copy of all of them: forge.optim.optimizer), plus the activations a training step keeps for its backward,
counted per token of a micro-batch row for each part of the model (backbone block, memory chunk, gate, TRM
refiner application, deep-supervision head of every outer step), for the checkpointing mode (what a checkpointed
segment keeps, and the one segment its backward recomputes at a time), the device's loss head (the fused,
chunked head on CPU: forge.model.model.FUSED_CE_DEVICES) and attention kernel (CPU's flash kernel keeps O(T) per
head, plus the T x T mask of a dense sliding window). The coefficients are the tensors the code saves (read off
the code, then checked against the ledger below); the peak is at the micro-batch the spec trains on
(data.batch_size / data.grad_accum: accumulated micro-batches share one set of gradients) and the longest
sequence of its curriculum.

Validation, two ways (benchmarks/bench_memory_estimate.py, BENCHMARKS.md "Memory estimate"):
  - `ledger_peaks` runs the real training step on the meta device (no memory allocated, no arithmetic), with a
    dispatch mode that books every storage the step's operators create and, by a weak reference, frees: its
    high-water mark is the live tensor bytes of the step, from the model's and optimizer's own code (seconds:
    the meta kernels run in Python, so it validates, it is not the estimate; fp32);
  - the measured peak of a real step on CPU: the peak anonymous resident memory of a fresh process over three
    steps minus its value before the model is built. Three: the optimizer's kept copy of its state (the
    non-finite guard's) is made in the second step's optimizer call, after that step's forward and backward, so
    the third is the first to run them beside everything a run's later steps hold (the estimate's peak).
`forge check` adds, on CPU, what its own process holds (process_bytes: the interpreter, torch, forge): a training
process holds the same before its first step (the data's token arrays come on top).
"""
from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GB = 1e9
MODES = ("off", "backbone", "backbone_and_trm")
FLOAT = 4


class Ledger(TorchDispatchMode):
    """Live bytes of every storage created inside the mode (and those registered with `hold`), and their peak.
    fake_host_reads: answer the step's host reads (meta tensors hold no value), as on the meta device."""

    def __init__(self, fake_host_reads: bool = True):
        super().__init__()
        self.fake_host_reads = fake_host_reads
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def hold(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        size = storage.nbytes()
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and self.fake_host_reads:
            # a host read: a bool is a finiteness check (finite); a (1,) float the non-finite flag (0); a 0-dim
            # float AdamW's step count (1)
            t = args[0]
            return True if t.dtype == torch.bool else 0 if t.dim() else 1
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.hold(t)
        return out


def cpu_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """scaled_dot_product_attention as the CPU runs it (its flash kernel: q, k, v, the output and the log-sum-exp
    kept for the backward), where the meta device would take the math path (a T x T score matrix per head)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                       attn_mask=attn_mask, scale=scale)[0]


@dataclass(frozen=True)
class StepPeak:
    """The ledger's figures of one training step (bytes)."""
    weights: int          # parameters and buffers
    optimizer: int        # the optimizer's state and its kept copy, after two steps
    peak: int             # the high-water mark of the step: weights, optimizer state, gradients, activations


def ledger_peaks(spec, micro_batches: tuple[int, ...], seq_len: int, mode: str,
                 device_type: str = "cpu", on: str = "meta") -> list[StepPeak]:
    """The ledger's StepPeak of an fp32 training step of `spec` at each micro-batch, sequence length seq_len and
    gradient checkpointing `mode`, with the loss head of a device of type `device_type`
    (forge.model.model.FUSED_CE_DEVICES) and CPU's attention kernel; the step runs on device `on`: "meta" (no
    memory, seconds), or "cpu" to book the storages the CPU's own kernels create (a real step: its time)."""
    from forge.model import build_model
    from forge.model.objective import LOCAL
    from forge.optim import build_optimizer
    from forge.optim.qk_clip import set_max_logit_tracking
    from forge.train.objective import training_loss

    with torch.random.fork_rng(devices=[]):
        model = build_model(spec.model, spec.objective, device=on)
    model.train()
    model.set_gradient_checkpointing(mode)
    model.head_device_type = device_type
    set_max_logit_tracking(model, spec.optim.qk_clip.enabled)
    optimizer = build_optimizer(spec.optim, model)
    ledger = Ledger(fake_host_reads=on == "meta")
    # the model calls torch.nn.functional.scaled_dot_product_attention: on the meta device, the CPU's kernel
    kernel = (mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", cpu_attention) if on == "meta"
              else contextlib.nullcontext())
    with ledger, kernel:
        for t in [*model.parameters(), *model.buffers()]:
            ledger.hold(t)
        weights = ledger.current
        for _ in range(2):                        # the first step creates the state, the second its kept copy
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        state = ledger.current - weights
        peaks = []
        for batch in micro_batches:
            idx = torch.zeros(batch, seq_len + 1, dtype=torch.long, device=on)
            ledger.reset_peak()
            out = model(idx[:, :-1], idx[:, 1:], act_loss_weight=spec.model.act.loss_weight)
            training_loss(model, out, spec.model.act.loss_weight, LOCAL).backward()
            del out
            for attn in model.modules():          # QK-clip consumes the record after the step (nothing allocated)
                if hasattr(attn, "max_logit"):
                    attn.max_logit = None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            peaks.append(StepPeak(weights, state, ledger.peak))
    return peaks


# ------------------------------------------------------------------------------------------------ the estimate
@dataclass(frozen=True)
class Estimate:
    """A training step's predicted peak (bytes), by part, at one setting."""
    device: str            # cpu | cuda
    precision: str         # fp32 | bf16
    micro_batch: int       # rows per forward (data.batch_size / data.grad_accum)
    grad_accum: int
    seq_len: int           # the longest sequence of the curriculum
    mode: str              # train.gradient_checkpointing
    weights: int
    optimizer: int         # optimizer state and the non-finite guard's kept copy (of weights and state)
    activations: int       # the step's high-water mark of activations, temporaries and gradients
    runtime: int           # the process beyond the step (CPU: process_bytes)

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations + self.runtime

    def setting(self) -> str:
        return (f"batch {self.micro_batch * self.grad_accum} = {self.grad_accum} x {self.micro_batch}, seq "
                f"{self.seq_len}, {self.precision}, checkpointing {self.mode}")

    def bytes(self) -> dict[str, int]:
        return {"weights": self.weights, "optimizer": self.optimizer, "activations": self.activations,
                "runtime": self.runtime}

    def parts(self) -> str:
        return (f"weights {self.weights / GB:.2f} + optimizer {self.optimizer / GB:.2f} + activations and gradients "
                f"{self.activations / GB:.2f}" + (f" + runtime {self.runtime / GB:.2f}" if self.runtime else "") + " GB")


@dataclass(frozen=True)
class Shapes:
    """The model's parameter counts by optimizer (its sizes the arithmetic reads from the spec)."""
    params: int            # every trainable parameter (the tied head once)
    muon: int              # elements updated by Muon
    adamw: int             # elements updated by AdamW
    grokfast: bool
    buffer_bytes: int      # the buffers (the ACT accuracy EMA and its count)


def model_shapes(spec, model) -> Shapes:
    """From the model built on the meta device (nothing allocated) and the optimizer routing of spec.optim."""
    from forge.optim.routing import route_parameters

    plans = route_parameters(spec.optim, model)
    count = {kind: sum(p.numel() for g in plans if g.kind == kind for p in g.params) for kind in ("muon", "adamw")}
    return Shapes(count["muon"] + count["adamw"], count["muon"], count["adamw"],
                  spec.optim.recipe.grokfast and spec.optim.grokfast.enabled,
                  sum(b.numel() * b.element_size() for b in model.buffers()))


def block_floats(d: int, hidden: int, heads: int) -> int:
    """Floats per token a pre-norm attention + SwiGLU block keeps for its backward, its output included (its input
    is its producer's): the norms' outputs and rstd, the residual between, q and k after RoPE, v, the attention
    output and o_proj's copy of it, the output (10 d + 2 in all), CPU flash attention's log-sum-exp (heads), and
    SwiGLU's gate, its SiLU, up and their product (4 hidden). Equal to the ledger's count at tiny and phase1
    shapes."""
    return 10 * d + 4 * hidden + heads + 2


def memory_floats(m, d: int, seq_len: int) -> int:
    """Floats per sequence the memory scan keeps (forge.model.memory): per token its projections, convolution
    and activations (7 d_mem) and, per MLP layer pair, the read's and the write's recall and the explicit
    backward's products (16 hidden); per chunk the new weights and surprise (2 P, P = the memory's weight
    count); the last chunk's write feeds nothing (no backward: 2 P and 9 hidden per token fewer)."""
    hidden = m.expansion * m.d_mem if m.variant == "mlp" else 0
    dims = ([m.d_mem] + [hidden] * (m.depth - 1) + [m.d_mem]) if m.variant == "mlp" else [m.d_mem, m.d_mem]
    weights = sum(a * b for a, b in zip(dims, dims[1:]))
    chunks = -(-seq_len // m.chunk_size)
    last = seq_len - (chunks - 1) * m.chunk_size
    layers = m.depth - 1 if m.variant == "mlp" else 0
    per_token = 7 * m.d_mem + 16 * hidden * layers
    return seq_len * per_token + 2 * weights * (chunks - 1) - 9 * hidden * layers * last


def estimate(spec, shapes: Shapes, device: str, precision: str, *, micro_batch: int | None = None,
             grad_accum: int | None = None, seq_len: int | None = None, mode: str | None = None,
             runtime: int = 0) -> Estimate:
    """The predicted peak of a training step of `spec` on `device` ("cpu" | "cuda") in `precision` ("fp32" |
    "bf16"); micro_batch / grad_accum / seq_len / mode default to the spec's (module docstring); `runtime`: the
    process's memory beyond the step (process_bytes), added as it is.

    The step's high-water mark is the larger of two moments. The end of the forward: every part's kept
    activations (floats per token of a row, below) and what does not grow with the rows (the fused head's weight
    gradient per outer step and one chunk of its logits, the dense band's masks). And, with checkpointing, the
    backward's recomputation of the first segment it reaches: with "backbone_and_trm" the last refiner application,
    while everything but the last head is still kept, plus the gradients; with "backbone" the blocks come last,
    when little else is left."""
    from forge.model.loss import CE_CHUNK
    from forge.model.model import FUSED_CE_DEVICES

    m = spec.model
    grad_accum = grad_accum or spec.data.grad_accum
    micro_batch = micro_batch or spec.data.batch_size // grad_accum
    seq_len = seq_len or max([spec.data.seq_len, *(stage.seq_len for stage in spec.data.curriculum)])
    mode = mode or spec.train.gradient_checkpointing
    d, T, H = m.d_model, seq_len, m.n_heads
    rows = micro_batch * T
    block = block_floats(d, m.ffn_hidden, H)
    backbone = d + m.n_layers * (d if mode != "off" else block)     # embedding, blocks (a checkpointed block: its output)
    kept = backbone
    kept += (memory_floats(m.memory, d, T) / T + 2 * m.gate.hidden + 15 * d + 2) if m.memory.enabled else d + 1
    steps, refiner = 1, 0
    if m.trm.enabled:   # an application of f keeps its blocks, its norm and its input sum (checkpointed: its output)
        steps = m.trm.t_max
        refiner = m.trm.n_layers * block_floats(d, m.trm.ffn_hidden, H) + 3 * d + 1
        applications = steps * (m.trm.micro_steps + 1 if m.trm.grad_cycles == "all" else 2)
        kept += applications * (d if mode == "backbone_and_trm" else refiner)
    # deep supervision, every outer step: the normalised state and its rstd, CE and predictions, and the fused
    # head's gradient of its input (CPU), else log_softmax's output over the vocabulary
    fused = device in FUSED_CE_DEVICES
    head = d + 8 + (d if fused else m.vocab_size)
    kept += steps * head
    masks = 0                                                       # the dense band's bool mask, kept per call
    if m.attention.type != "full" and m.attention.sw_window < T < 8 * m.attention.sw_window:
        calls = m.n_layers + (m.trm.n_layers * m.trm.t_max * (m.trm.micro_steps + 1) if m.trm.enabled else 0)
        masks = T * T * calls
    fused_head = steps * m.vocab_size * d * FLOAT + min(CE_CHUNK, rows) * m.vocab_size * FLOAT if fused else 0
    forward = rows * kept * FLOAT + fused_head + masks
    gradients = shapes.params * FLOAT
    if mode == "backbone_and_trm" and m.trm.enabled:
        backward = rows * (kept - head + refiner) * FLOAT + masks + gradients
    elif mode != "off":
        backward = rows * (backbone + block) * FLOAT + masks + gradients
    else:
        backward = 0
    # the optimizer step, activations freed: the gradients, Muon's Nesterov updates, their orthogonalised form
    # and Newton-Schulz's stacked working copies (3.5 x its matrices, the ledger on phase1), AdamW's foreach
    # temporaries (2 x its parameters)
    optimizer_step = gradients + int((3.5 * shapes.muon + 2 * shapes.adamw) * FLOAT)
    activations = max(forward, backward, optimizer_step)
    if precision == "bf16":
        activations = int(activations * BF16_ACTIVATION_SHARE)
    weights = shapes.params * FLOAT + shapes.buffer_bytes
    state = shapes.muon + 2 * shapes.adamw + (shapes.params if shapes.grokfast else 0)
    optimizer = (state + shapes.params) * FLOAT + state * FLOAT    # state, kept copy of weights and state
    return Estimate(device, precision, micro_batch, grad_accum, seq_len, mode, weights, optimizer, int(activations),
                    runtime)


def process_bytes() -> int:
    """This process's anonymous resident memory (/proc/self/statm: resident - shared; 0 where unreadable): on CPU
    what a training process holds besides its step (interpreter, torch, forge), as `forge check` holds it."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            _, resident, shared = (int(x) for x in f.read().split()[:3])
    except (OSError, ValueError):
        return 0
    return (resident - shared) * os.sysconf("SC_PAGE_SIZE")


# bf16 autocast: the share of fp32's activation bytes (matmul outputs in bf16; norms, softmax, losses, the fused
# head's gradients in fp32): phase1 at batch 4 x 512 on this AVX-512 BF16 CPU measured 2.10 GB in bf16, weights
# and optimizer 0.75 GB of it, against 1.86 GB of fp32 activations estimated (bench_memory_estimate.py).
BF16_ACTIVATION_SHARE = 0.75


@dataclass(frozen=True)
class Change:
    """A spec change (as --set overrides) and the step's predicted peak with it."""
    overrides: str
    peak: int


@dataclass(frozen=True)
class Target:
    """The device a spec is judged for: its type, the precision the step computes in there, its memory budget
    (bytes; None when unknown) and where the budget comes from."""
    device: str
    precision: str
    bf16_native: bool
    budget: int | None
    where: str


def target(spec, device: str | None = None, memory_gb: float | None = None) -> Target:
    """`device` (forge check --device; default the spec's train.device resolved here) and its budget: memory_gb,
    else total RAM on CPU or the GPU's total memory on CUDA (None for CUDA on a machine without one)."""
    from forge.spec.budget import total_bytes
    from forge.train.components import resolve_device
    from forge.train.precision import resolve_precision

    device = device or resolve_device(spec.train.device).type
    setting = spec.train.precision
    if device == "cpu" or torch.cuda.is_available():
        resolved = resolve_precision(setting, torch.device(device))
        name, native = resolved.name, resolved.bf16_native
    else:                        # a GPU not on this machine: auto is bf16 on one that computes it natively
        name, native = ("bf16" if setting == "auto" else setting), True
    if memory_gb is not None:
        return Target(device, name, native, int(memory_gb * GB), "--memory-gb")
    budget, where = total_bytes(device)
    return Target(device, name, native, budget, where)


def fitting_changes(spec, shapes: Shapes, at: Target, limit: int, runtime: int = 0) -> list[Change]:
    """The spec changes that bring the predicted peak under `limit`: the lightest of each lever that fits alone
    (a checkpointing mode, micro-batching through data.grad_accum, bf16 where native), else the lightest
    combinations; each with its predicted peak."""
    batch, mode = spec.data.batch_size, spec.train.gradient_checkpointing
    modes = list(MODES[MODES.index(mode):])
    accums = [g for g in range(spec.data.grad_accum, batch + 1) if batch % g == 0]
    precisions = [at.precision] + (["bf16"] if at.precision == "fp32" and at.bf16_native else [])

    def peak(m: str, g: int, p: str) -> int:
        return estimate(spec, shapes, at.device, p, grad_accum=g, mode=m, runtime=runtime).total

    def overrides(m: str, g: int, p: str) -> str:
        changed = [(f'train.gradient_checkpointing={m}', m != mode), (f"data.grad_accum={g}", g != accums[0]),
                   (f"train.precision={p}", p != at.precision)]
        return " --set ".join(text for text, differs in changed if differs)

    singles = [next(((m, accums[0], precisions[0]) for m in modes[1:] if peak(m, accums[0], precisions[0]) <= limit), None),
               next(((mode, g, precisions[0]) for g in accums[1:] if peak(mode, g, precisions[0]) <= limit), None),
               next(((mode, accums[0], p) for p in precisions[1:] if peak(mode, accums[0], p) <= limit), None)]
    found = [s for s in singles if s is not None]
    if not found:            # per mode and precision, the fewest micro-batches that fit
        for m in modes:
            for p in precisions:
                g = next((g for g in accums if peak(m, g, p) <= limit), None)
                if g is not None and (m, g, p) != (mode, accums[0], precisions[0]):
                    found.append((m, g, p))
    changes = [Change(overrides(*s), peak(*s)) for s in found]
    parts = [set(c.overrides.split(" --set ")) for c in changes]   # drop a combination that adds to another
    return [c for c, mine in zip(changes, parts) if not any(other < mine for other in parts)]
