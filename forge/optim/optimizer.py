"""MuonGrokfast: one optimizer object over Muon (hidden matrices) and AdamW (everything else).

One call to step() runs, in this order (the trainer calls backward, possibly for several
micro-batches, and the data-parallel gradient average before it, and qk_clip after it):

    1. raw gradient norm; a non-finite gradient skips the whole step
    2. Grokfast: g <- g + lam * EMA(g), once per optimizer step           (D1)
    3. clip the global gradient norm to grad_clip (the norm is measured after Grokfast, before clipping)
    4. Muon update of the hidden matrices, AdamW update of the rest        (D2)
    5. one fused finiteness check over the updated weights

A step is skipped when the raw gradient (1), the filtered gradient (2: a huge lam overflows it) or the
updated weights (5: an lr of inf, an overflow in the update) are not finite. A skipped step changes
nothing: the weights, the momenta and moments and the Grokfast EMA are restored from the copy kept before
step 2, so one bad batch or setting cannot poison them, and a checkpoint never holds what it produced.
skipped_steps counts every skipped step, whatever the cause; step() returns whether the update was applied.

After an applied step, p.grad holds the filtered and clipped gradient.
"""
from __future__ import annotations

from typing import Any

import torch

from forge.errors import ForgeError
from forge.optim.grokfast import GrokfastFilter
from forge.optim.muon import Muon

STATE_FORMAT = 1


class MuonGrokfast:
    """The optimizer the trainer sees; build it with forge.optim.build_optimizer(spec.optim, model)."""

    def __init__(self, muon: Muon | None, adamw: torch.optim.AdamW | None, grokfast: GrokfastFilter | None,
                 grad_clip: float):
        self.muon, self.adamw, self.grokfast = muon, adamw, grokfast
        self.inner = [opt for opt in (muon, adamw) if opt is not None]
        self.params = [p for opt in self.inner for group in opt.param_groups for p in group["params"]]
        self.grad_clip = grad_clip
        self.steps = 0           # updates applied
        self.skipped_steps = 0   # steps skipped: non-finite gradient, filtered gradient or updated weights
        self._metrics: dict[str, Any] = {}
        self._kept: _KeptCopy | None = None

    @property
    def param_groups(self) -> list[dict]:
        """Every group of both optimizers (the live dicts: writing 'lr' here changes the applied lr)."""
        return [group for opt in self.inner for group in opt.param_groups]

    def set_lr_factor(self, factor: float) -> None:
        """lr of every group <- its base lr (spec lr, overrides applied) x factor; used by the schedule."""
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * factor

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.inner:
            opt.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, collect_metrics: bool = False) -> bool:
        """Grokfast -> clip -> update -> finiteness check (see the module docstring). Returns True when the
        update was applied, False when the step was skipped (nothing changed).

        collect_metrics adds the costly diagnostics (EMA norm, orthogonality, effective rank) to
        metrics(); leave it off except on logging steps (F1).
        """
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            raise RuntimeError("optimizer step with no gradients: call backward() before step()")
        raw_norm = torch.nn.utils.get_total_norm(grads)
        metrics: dict[str, Any] = {"optim/grad_raw_norm": raw_norm}
        if not torch.isfinite(raw_norm):
            return self._skip(metrics)
        self._kept = _KeptCopy.of(self, self._kept)
        grad_norm = raw_norm
        if self.grokfast is not None:
            self.grokfast.apply_()
            grad_norm = torch.nn.utils.get_total_norm(grads)
            if not torch.isfinite(grad_norm):   # lam * EMA overflowed
                self._kept.restore(self)
                return self._skip(metrics)
            if collect_metrics:
                # design band 1.0-1.5: how much the filter g + lam * g_ema amplifies the raw gradient
                # (lam 0.3 with an aligned EMA gives ~1.3; far above 1.5 the slow component dominates, D1)
                metrics["optim/grokfast_ema_norm"] = self.grokfast.ema_norm()
                metrics["optim/grad_ema_ratio"] = grad_norm / raw_norm
        metrics["optim/grad_norm"] = grad_norm
        torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, grad_norm)
        update_metrics = {}
        if self.muon is not None:
            update_metrics = self.muon.step(collect_metrics=collect_metrics)
        if self.adamw is not None:
            self.adamw.step()
        if not all_finite(self.params):
            self._kept.restore(self)
            return self._skip(metrics)
        metrics.update(update_metrics)
        for group in self.param_groups:
            metrics[f"optim/lr_{group['name']}"] = group["lr"]
        self.steps += 1
        self._metrics = metrics
        return True

    def _skip(self, metrics: dict[str, Any]) -> bool:
        self.skipped_steps += 1
        metrics["optim/skipped_steps"] = self.skipped_steps
        self._metrics = metrics
        return False

    def metrics(self) -> dict[str, Any]:
        """Metrics of the last step: grad norms, lr applied per group (optim/lr_<group>) and, if that
        step collected them, optim/grokfast_ema_norm, optim/grad_ema_ratio, optim/ortho_error,
        optim/effective_rank. Values are floats or 0-dim tensors computed from the step's tensors."""
        return dict(self._metrics)

    # ------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain Python values only: torch.load(weights_only=True) reads it back."""
        return {
            "format": STATE_FORMAT,
            "muon": None if self.muon is None else self.muon.state_dict(),
            "adamw": None if self.adamw is None else self.adamw.state_dict(),
            "grokfast": None if self.grokfast is None else self.grokfast.state_dict(),
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore momenta, moments, the Grokfast EMA and step counts. Hyperparameters (lr, weight decay,
        betas, ns_steps, ...) stay those of the current spec: the checkpoint carries state, not config."""
        if state.get("format") != STATE_FORMAT:
            raise ForgeError(f"optimizer state has format {state.get('format')!r}, expected {STATE_FORMAT}")
        missing = sorted({"muon", "adamw", "grokfast", "steps", "skipped_steps"} - set(state))
        if missing:
            raise ForgeError(f"optimizer state lacks {', '.join(missing)}")
        for part, current in (("muon", self.muon), ("adamw", self.adamw), ("grokfast", self.grokfast)):
            if (state[part] is None) != (current is None):
                saved = "has" if state[part] is not None else "has no"
                raise ForgeError(f"optimizer state {saved} {part} state, unlike this run's optimizer: optim.name or "
                                 f"optim.grokfast.enabled differ from the checkpoint's spec")
        try:
            for opt, part in ((self.muon, "muon"), (self.adamw, "adamw")):
                if opt is not None:
                    settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
                    opt.load_state_dict(state[part])
                    for group, setting in zip(opt.param_groups, settings):
                        group.update(setting)
            if self.grokfast is not None:
                self.grokfast.load_state_dict(state["grokfast"])
        except (ValueError, KeyError) as err:
            raise ForgeError(f"optimizer state does not fit this model/spec: {err}") from None
        self.steps = state["steps"]
        self.skipped_steps = state["skipped_steps"]


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """One fused pass over `tensors` (multiplying by 1.0 in place changes no value): True if none holds NaN/inf."""
    found = torch.zeros(1, device=tensors[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.ones(1, device=found.device))
    return not bool(found.item())


class _KeptCopy:
    """The weights, the inner optimizers' state tensors and the Grokfast EMA as they were before an update,
    copied into buffers kept from step to step (one fused copy each way), so that a step whose result is
    not finite can be undone. States created by the undone step (the first one) are removed again."""

    def __init__(self, live: list[torch.Tensor]):
        self.live = live
        self.saved = [t.detach().clone() for t in live]
        self.state_keys: list[set] = []
        self.ema_started: list[bool] = []

    @classmethod
    def of(cls, opt: MuonGrokfast, previous: "_KeptCopy | None") -> "_KeptCopy":
        live = list(opt.params)
        for inner in opt.inner:
            for state in inner.state.values():
                live.extend(v for v in state.values() if isinstance(v, torch.Tensor))
        if opt.grokfast is not None:
            live.extend(e for e in opt.grokfast.ema if e is not None)
        if previous is not None and len(previous.live) == len(live) and \
                all(a is b for a, b in zip(previous.live, live)):
            kept = previous
            torch._foreach_copy_(kept.saved, live)
        else:   # the first step, or state tensors were created or replaced (a load_state_dict)
            kept = cls(live)
        kept.state_keys = [set(inner.state) for inner in opt.inner]
        kept.ema_started = [e is not None for e in opt.grokfast.ema] if opt.grokfast is not None else []
        return kept

    def restore(self, opt: MuonGrokfast) -> None:
        torch._foreach_copy_(self.live, self.saved)
        for inner, keys in zip(opt.inner, self.state_keys):
            for p in [p for p in inner.state if p not in keys]:
                del inner.state[p]
        if opt.grokfast is not None:
            opt.grokfast.ema = [e if started else None for e, started in zip(opt.grokfast.ema, self.ema_started)]
