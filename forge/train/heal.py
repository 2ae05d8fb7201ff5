"""Self-healing runs ([train.heal], `forge train --heal`): a critical finding of the debugging tree that fires
during training is acted on at once, the way PaLM and OLMo recovered from spikes by hand.

The findings are the debugging tree's own (checklists/diagnose.toml, evaluated by forge.diagnose.rules with the
shared rule engine over the live metrics stream): no second copy of the rules. When a rule of
train.heal.modes fires, the heal
    (a) records the finding with its evidence (lineage.json "heals": the run's timeline),
    (b) rolls back to the newest verified checkpoint written before the finding's onset (the first step of
        the window its evidence read; step 0, a fresh initialisation with the run's seed, when there is none):
        later checkpoints move to <run>/abandoned/, metrics.jsonl is rewound to that step,
    (c) applies the finding's first remedy as the recorded patch `forge diagnose --apply` writes
        (forge.diagnose.patch: a spec <stem>.r<N>.toml that extends the run's, with the evidence),
    (d) runs the before-first-run checklist on the patched spec: a remedy that adds a critical failure is never
        applied (the run stops with the diagnosis),
    (e) continues in the same run directory under the patched spec (spec.toml and lineage.json follow it, so a
        plain --resume continues the healed run).
Bounded: after max_attempts heals, or when a finding returns after its remedy, the run stops (status failed)
with the diagnosis.

Bad batches: the losses of every micro-batch of the last train.heal.batch_window steps are kept with their loader
positions (global batch, micro-batch). A heal of a rule in train.heal.attribute (loss spikes, non-finite losses)
attributes the finding to the micro-batches after the rollback step whose robust z-score (forge.metrics.signals)
exceeds batch_z; their positions go to skipped_batches.json, which the loader reads at every start (so a resume
skips them too, deterministically) and never trains on.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge.errors import ForgeError, Problem, SpecError

SKIPPED = "skipped_batches.json"


def healable_rules(resolved) -> list:
    """The rules of train.heal.modes, checked: each a critical rule of checklists/diagnose.toml with a remedy (and
    each of train.heal.attribute a rule there). SpecError naming the key otherwise (exit 2, nothing written)."""
    from forge.checklist.items import checklist_dir
    from forge.diagnose.rules import load_rules
    from forge.spec.load import _locate

    spec = resolved.spec
    where = {key: _locate(("train", "heal", key), resolved.origins, str(resolved.path))
             for key in ("modes", "attribute")}
    path = checklist_dir() / "diagnose.toml"
    rules = {r.id: r for r in load_rules(path)}
    problems = []
    for n, mode in enumerate(spec.train.heal.modes):
        rule = rules.get(mode)
        if rule is None:
            problems.append(Problem(where["modes"], f"train.heal.modes[{n}]", f"{mode!r} is not a rule of {path}"))
        elif rule.severity != "critical" or not rule.remedy:
            problems.append(Problem(where["modes"], f"train.heal.modes[{n}]", f"{mode} cannot be healed: only critical "
                                    f"rules with a remedy can (it is {rule.severity}"
                                    f"{', with no remedy' if not rule.remedy else ''})"))
    for n, rule_id in enumerate(spec.train.heal.attribute):
        if rule_id not in rules:
            problems.append(Problem(where["attribute"], f"train.heal.attribute[{n}]",
                                    f"{rule_id!r} is not a rule of {path}"))
    if problems:
        raise SpecError(problems, header="invalid [train.heal]")
    return [rules[m] for m in spec.train.heal.modes]


def read_skipped(run) -> set[tuple[int, int]]:
    """The loader positions a heal set aside ((global batch, micro-batch)); empty when none."""
    path = run.path / SKIPPED
    if not path.is_file():
        return set()
    data = run.read(SKIPPED)
    try:
        return {(int(b["batch"]), int(b["micro"])) for b in data["batches"]}
    except (KeyError, TypeError, ValueError):
        raise ForgeError(f"{path}: not a skipped-batches record (expected {{\"batches\": [{{\"batch\": N, "
                         "\"micro\": M, ...}]}})") from None


class NullHealer:
    """train.heal.enabled = false: nothing is kept, nothing fires."""

    def batch_loss(self, step: int, batch: int, micro: int, loss) -> None:
        pass

    def observe(self, history: list[dict[str, Any]]):
        return None


class Healer:
    """Consulted by the Trainer at each logged record: the first healable finding that fires (the tree's order:
    critical, most confident first), or None."""

    def __init__(self, resolved):
        from forge.metrics.catalogue import load_catalogue

        self.spec = resolved.spec
        self.rules = healable_rules(resolved)
        self.spec_data = self.spec.model_dump(mode="json")
        self.catalogue = load_catalogue()
        grad_accum = self.spec.data.grad_accum
        self.losses: collections.deque = collections.deque(maxlen=self.spec.train.heal.batch_window * grad_accum)

    def batch_loss(self, step: int, batch: int, micro: int, loss) -> None:
        self.losses.append((step, batch, micro, loss))   # a device tensor: read only when a heal attributes

    def observe(self, history: list[dict[str, Any]]):
        from forge.diagnose.rules import evaluate_rule
        from forge.metrics.engine import Records

        recs = Records(history, self.catalogue)
        fired = [v for v in (evaluate_rule(r, recs, self.spec_data, None) for r in self.rules) if v.state == "fired"]
        return min(fired, key=lambda v: v.rank()) if fired else None

    def bad_batches(self, after_step: int) -> list[dict[str, Any]]:
        """Micro-batches of steps after `after_step` whose loss's robust z-score exceeds batch_z."""
        from forge.metrics.signals import robust_z

        kept = [(s, b, m, float(loss)) for s, b, m, loss in self.losses]
        scores = robust_z([x for *_, x in kept])
        bound = self.spec.train.heal.batch_z
        return [{"batch": b, "micro": m, "step": s, "loss": x if math.isfinite(x) else None,
                 "z": round(z, 2) if math.isfinite(z) else None}
                for (s, b, m, x), z in zip(kept, scores) if s > after_step and z > bound]


def make_healer(resolved):
    return Healer(resolved) if resolved.spec.train.heal.enabled else NullHealer()


@dataclass
class Heal:
    """What training continues with after a heal: the patched spec and its components, restored from the rollback
    checkpoint (counters/window None: a fresh initialisation at step 0), with the loader's skip list set. Or
    `stop`: the diagnosis the run ends with."""
    resolved: Any = None
    parts: Any = None
    counters: Any = None
    window: Any = None
    rollback_step: int = 0
    stop: str | None = None


def heals(run) -> list[dict[str, Any]]:
    """The run's heal timeline (lineage.json "heals"); empty for a run that never healed."""
    if not (run.path / "lineage.json").is_file():
        return []
    lineage = run.read("lineage.json")
    return list(lineage.get("heals", [])) if isinstance(lineage, dict) else []


def _update_lineage(run, **changes) -> None:
    lineage = run.read("lineage.json")
    lineage.update(changes)
    run.write("lineage.json", lineage)


def timeline_rows(run) -> list[tuple[str, str, str, str, str]]:
    """The heal timeline as (step, finding, rollback, patch, outcome) strings (forge report)."""
    rows = []
    for h in heals(run):
        patch = h.get("patch")
        changes = ", ".join(f"{c['key']}: {c['before']!r} -> {c['after']!r}" for c in patch["changes"]) if patch else ""
        rollback = "-" if h.get("rollback_step") is None else f"{h['rollback_step']} ({h.get('checkpoint')})"
        rows.append((str(h.get("step")), f"{h.get('finding')}: {'; '.join(h.get('evidence', []))}", rollback,
                     f"{Path(patch['spec']).name}: {changes}" if patch else "-", str(h.get("outcome"))))
    return rows


def close_outcome(run, outcome: str) -> None:
    """The last heal's outcome, once known (the run finished, another finding fired, the same one returned)."""
    timeline = heals(run)
    if timeline and timeline[-1].get("outcome") == "continuing":
        timeline[-1]["outcome"] = outcome
        _update_lineage(run, heals=timeline)


def _onset(verdict, step: int) -> int:
    firsts = [o.first for o in verdict.evidence if o.first is not None]
    return min(firsts) if firsts else step


def _rollback_point(run, onset: int) -> Path | None:
    """The newest checkpoint before `onset` that verifies (None: start again from step 0)."""
    from forge.train import checkpoint as ckpt

    for path in reversed(ckpt.list_checkpoints(run.checkpoints, lambda _: None)):
        if ckpt.step_of(path) < onset and ckpt.verify(path) is None:
            return path
    return None


def _gate(resolved):
    """The patched spec's before-first-run checklist, less the W&B readiness check: the run's own W&B run is
    live (its mirror), and a second wandb.init in this process would end it."""
    from forge.checklist.items import load_checklist

    checklist = load_checklist(resolved.spec.run.checklist)
    return checklist.model_copy(update={"items": [i for i in checklist.items if i.check != "wandb_ready"]})


def _stop(run, entry: dict[str, Any], outcome: str, message: str) -> Heal:
    close_outcome(run, outcome)
    _update_lineage(run, heals=[*heals(run), {**entry, "rollback_step": None, "patch": None, "outcome": message}])
    return Heal(stop=message)


def heal(resolved, run, verdict, step: int, healer: Healer, data_dir: Path, log) -> Heal:
    """Act on `verdict` (a fired rule) seen at `step`: (a)-(d) of the module's docstring, and the patched spec's
    components restored to the rollback point; the caller rewinds the records and continues (e)."""
    from forge.checklist.runner import run_checklist
    from forge.diagnose.patch import build_patch, write_or_reuse
    from forge.spec.load import load_spec
    from forge.spec.render import resolved_toml
    from forge.train import checkpoint as ckpt
    from forge.train.components import build_components
    from forge.train.launch import lineage as launch_lineage
    from forge.train.loop import restore

    spec = resolved.spec
    timeline = heals(run)
    rule = verdict.rule
    onset = _onset(verdict, step)
    entry = {"attempt": len([h for h in timeline if h.get("patch")]) + 1, "step": step, "finding": rule.id,
             "title": rule.title, "confidence": verdict.confidence, "evidence": [o.text for o in verdict.evidence],
             "onset": onset}
    shown = f"{rule.id} ({rule.title}) at step {step}: {verdict.reason}"
    until = f"recovered until step {step} (then {rule.id})"     # the previous heal's outcome, if any
    log.alert(f"forge heal: {rule.id}", shown)
    if any(h.get("finding") == rule.id and h.get("patch") for h in timeline):
        return _stop(run, entry, f"returned at step {step}",
                     f"{shown}; it returned after its remedy (heal attempts: {entry['attempt'] - 1}); stopped: run "
                     f"`forge diagnose {run.run_id}`")
    if entry["attempt"] > spec.train.heal.max_attempts:
        return _stop(run, entry, until,
                     f"{shown}; train.heal.max_attempts = {spec.train.heal.max_attempts} heals are spent; stopped: "
                     f"run `forge diagnose {run.run_id}`")
    if not verdict.suggestions:
        return _stop(run, entry, until,
                     f"{shown}; its remedies are already in the spec chain; stopped: run `forge diagnose {run.run_id}`")
    lineage = run.read("lineage.json")
    try:
        written, reused = write_or_reuse(build_patch(verdict, verdict.suggestions[0], run.run_id, lineage))
    except ForgeError as err:     # e.g. the run's spec file changed or went away since the run started
        return _stop(run, entry, until,
                     f"{shown}; its remedy cannot be recorded ({err}); stopped: run `forge diagnose {run.run_id}`")
    patched = load_spec(written.spec_path)
    before = {r["id"] for r in run.read("checklist.json").get("items", []) if r.get("status") == "fail"}
    checked = run_checklist(patched, data_dir=data_dir, checklist=_gate(patched))
    added = [r.id for r in checked.critical_failures if r.id not in before]
    if added:
        if not reused:   # never applied: no record of it either
            written.spec_path.unlink()
            written.path.unlink()
        return _stop(run, entry, until,
                     f"{shown}; its remedy ({verdict.suggestions[0].rationale}) fails the checklist "
                     f"({', '.join(added)}) and was not applied; stopped: run `forge diagnose {run.run_id}`")
    parts = build_components(patched.spec, data_dir)
    target, counters, window = _rollback_point(run, onset), None, None
    if target is not None:
        try:
            counters, window = restore(parts, target)
        except ckpt.CheckpointError:   # the remedy changed what a checkpoint holds (e.g. the model's shape)
            parts, target = build_components(patched.spec, data_dir), None
    rollback_step = ckpt.step_of(target) if target is not None else 0
    skipped = read_skipped(run)
    bad = healer.bad_batches(rollback_step) if rule.id in spec.train.heal.attribute else []
    if bad:
        known = run.read(SKIPPED)["batches"] if (run.path / SKIPPED).is_file() else []
        run.write(SKIPPED, {"batches": [*known, *[{**b, "finding": rule.id} for b in bad]]})
        skipped |= {(b["batch"], b["micro"]) for b in bad}
    changes = [{"key": c.key, "before": c.before, "after": c.after} for c in verdict.suggestions[0].changes]
    entry.update({"rollback_step": rollback_step,
                  "checkpoint": target.name if target is not None else f"fresh initialisation (seed {spec.run.seed})",
                  "patch": {"spec": str(written.spec_path), "record": str(written.path), "changes": changes,
                            "rationale": verdict.suggestions[0].rationale},
                  "skipped_batches": [[b["batch"], b["micro"]] for b in bad], "outcome": "continuing"})
    close_outcome(run, until)
    run.write("spec.toml", resolved_toml(patched))
    _update_lineage(run, **{**launch_lineage(patched, bool(lineage.get("forced"))), "heals": [*heals(run), entry]})
    log.alert(f"forge heal: rolled back to step {rollback_step}",
              f"{rule.id}: applied {written.spec_path.name} ({entry['patch']['rationale']}); "
              f"{len(bad)} batch(es) skipped; continuing")
    parts.loader.skip = skipped
    return Heal(patched, parts, counters, window, rollback_step)
