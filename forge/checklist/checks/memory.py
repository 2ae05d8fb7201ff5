"""Memory check (B1 budget overrun, the OOM branch): the training step's predicted peak against the device's
memory, before the first step (forge.train.memory_estimate: the model's activation arithmetic, no step run)."""
from __future__ import annotations

from forge.checklist.context import CheckContext
from forge.checklist.registry import Outcome, failed, passed, register, skipped

GB = 1e9


@register("memory_fits")
def memory_fits(ctx: CheckContext, headroom: float = 0.0) -> Outcome:
    """B1: the predicted peak of a training step at the spec's batch (its micro-batches), longest sequence,
    precision and checkpointing mode fits the budget: --memory-gb, else the device's memory (total RAM on CPU,
    the GPU's total memory on CUDA) less `headroom` (a share). Names the spec changes that would fit
    (checkpointing mode, micro-batching through data.grad_accum, bf16 where the device computes it natively),
    each with its predicted peak. data = the estimate by part and the suggestions."""
    from forge.model import build_model
    from forge.train.memory_estimate import estimate, fitting_changes, model_shapes, process_bytes, target

    spec = ctx.spec
    at = target(spec, ctx.device, ctx.memory_gb)
    shapes = ctx.cached("memory:shapes", lambda: model_shapes(
        spec, ctx.cached("meta_model", lambda: build_model(spec.model, spec.objective, device="meta"))))
    runtime = process_bytes() if at.device == "cpu" else 0
    peak = estimate(spec, shapes, at.device, at.precision, runtime=runtime)
    measured = f"{peak.total / GB:.2f} GB predicted on {at.device} ({peak.setting()}: {peak.parts()})"
    data = {"predicted_gb": round(peak.total / GB, 3), **{k: round(v / GB, 3) for k, v in peak.bytes().items()}}
    if at.budget is None:
        return skipped(f"{measured}; no budget: {at.where} (give --memory-gb)")
    limit = int(at.budget * (1 - headroom))
    expected = f"<= {limit / GB:.2f} GB ({at.where})"
    data["budget_gb"] = round(limit / GB, 3)
    if peak.total <= limit:
        return passed(measured, expected, f"{(limit - peak.total) / GB:.2f} GB to spare", data=data)
    changes = fitting_changes(spec, shapes, at, limit, runtime)
    for change in changes:
        data[f"with {change.overrides}"] = round(change.peak / GB, 3)
    fixes = "; ".join(f"--set {c.overrides}: {c.peak / GB:.2f} GB" for c in changes) or \
        "no change of checkpointing, micro-batching or precision fits: reduce data.batch_size, data.seq_len or the model"
    return failed(measured, expected, f"does not fit ({(peak.total - limit) / GB:.2f} GB over); fits with: {fixes}",
                  data=data)
