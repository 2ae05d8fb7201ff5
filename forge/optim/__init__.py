"""MuonGrokfast: Muon + Grokfast + QK-clip, with AdamW for the parameters Muon does not suit.

    opt = build_optimizer(spec.optim, model)       # Muon (hidden matrices) + AdamW (rest) + Grokfast
    schedule = build_lr_schedule(spec.train, opt)  # warmup + decay, applied to every group's base lr
    clip = QKClip(spec.optim.qk_clip, model)       # max-logit tracking on iff enabled
    for each step:
        loss.backward()  (x grad_accum)
        applied = opt.step(collect_metrics=logging_step)   # Grokfast -> clip -> Muon/AdamW
        n_clipped = clip.after_step(applied)           # qk_clip(model, spec.optim.qk_clip)
        schedule.step(); opt.zero_grad(set_to_none=True)
"""
from forge.optim.build import build_optimizer
from forge.optim.optimizer import MuonGrokfast
from forge.optim.qk_clip import QKClip, clippable_modules, qk_clip, set_max_logit_tracking
from forge.optim.routing import route_parameters
from forge.optim.schedule import LrSchedule, build_lr_schedule, lr_factor

__all__ = ["build_optimizer", "build_lr_schedule", "QKClip", "qk_clip", "set_max_logit_tracking", "clippable_modules",
           "route_parameters", "MuonGrokfast", "LrSchedule", "lr_factor"]
