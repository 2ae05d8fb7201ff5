"""`forge compare`: train the variants of a comparison against each other on this machine, fairly.

    plan (forge.compare.plan: validated, nothing written) -> runs/<id>/comparison.json -> each variant gated by
    its checklist into runs/<id>-<variant>/ (an ordinary run: `forge train --resume`, `forge diagnose` work on
    it) -> slices in turn -> the comparison view (forge.compare.view)

Round-robin (the default): every variant is set up in this process (forge.train.launch.train_in_slices) and
they take turns, one slice each: until the variant's next evaluation (train.eval_every), so that background
load on the machine hits every variant alike. --serial: each variant to its end, one after another. A slice
ends with an evaluation and a checkpoint, so between slices every variant can stop resumable. The held-out
batches are those of forge.data.build.Data.eval_batches: fixed by the data section, not by the seed or the
training; the record says whether every variant is scored on the same ones (plan.held_out_key).

Ctrl-C (or SIGTERM): a variant in its slice finishes its step and checkpoints (as forge train does); the others
are already at a checkpoint. Every variant ends interrupted and resumable; `forge compare --resume ID` goes on.
"""
from __future__ import annotations

import datetime as dt
import os
import platform
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forge import ui
from forge.compare.budget import Budget
from forge.compare.plan import Variant, held_out_key, plan_variants
from forge.errors import ForgeError
from forge.train.run_dir import read_json, write_json

FORMAT = 1
RECORD = "comparison.json"
EXIT = {"finished": 0, "interrupted": 130, "failed": 1}


@dataclass
class Request:
    specs: list[Path]
    vary: list[str] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)      # --set, for every variant
    budget: str | None = None
    seeds: int = 1
    serial: bool = False
    comparison_id: str | None = None
    resume: str | None = None
    output_dir: Path | None = None
    force: bool = False
    nproc: int | None = None
    data_dir: Path | None = None

    def check(self) -> None:
        if self.nproc:
            raise ForgeError("forge compare trains its variants in turns in one process; --nproc is not supported "
                             "here: compare on one process, or train each variant with forge train --nproc N")
        if self.resume and (self.specs or self.vary or self.shared or self.budget or self.comparison_id
                            or self.seeds != 1):
            raise ForgeError("--resume ID continues a comparison as recorded: give no SPEC, --vary, --set, "
                             "--budget, --seeds or --id with it")
        if not self.resume and self.budget is None:
            raise ForgeError("give a --budget: tokens=N (the same training tokens for every variant) or minutes=M "
                             "(the same training time)")


@dataclass
class Slot:
    """One variant while the comparison runs."""
    entry: dict[str, Any]                 # its record in comparison.json (updated in place)
    resolved: Any = None
    run: Any = None
    slices: Any = None                    # the train_in_slices generator
    trainer: Any = None
    seen_seconds: float = 0.0             # trainer.train_seconds already added to entry["train_seconds"]
    steps_here: int = 0                   # steps and seconds trained by this process: the seconds-per-step
    seconds_here: float = 0.0             # estimate of a minutes budget's last slice

    @property
    def active(self) -> bool:
        return self.trainer is not None


class _Stop:
    """SIGINT/SIGTERM between slices (a slice's trainer handles its own): stop after the current slice; a second
    signal stops at once (every variant keeps its last checkpoint)."""

    def __init__(self):
        self.reason: str | None = None
        self.previous = {}

    def __enter__(self):
        try:
            self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:   # not the main thread: no handlers, Ctrl-C is not ours to catch
            self.previous = {}
        return self

    def _handle(self, signum, _frame):
        if self.reason is not None:
            raise KeyboardInterrupt
        self.reason = f"stopped by {signal.Signals(signum).name}"
        ui.print_text(f"{signal.Signals(signum).name}: stopping after this slice (again to stop at once)")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def new_comparison_id(now: dt.datetime | None = None) -> str:
    import secrets

    now = now or dt.datetime.now()
    return f"cmp-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def machine() -> dict[str, Any]:
    import torch

    from forge.train.precision import cpu_name

    return {"host": platform.node(), "platform": platform.platform(), "processor": cpu_name(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


@dataclass
class Outcome:
    status: str
    record: dict[str, Any]
    path: Path

    @property
    def exit_code(self) -> int:
        return EXIT[self.status]


def run_comparison(request: Request, max_slices: int | None = None) -> Outcome:
    """Plan (or reopen) the comparison and train it; `max_slices` stops (as Ctrl-C would) after that many slices
    in all, every variant resumable."""
    from forge.checklist.context import default_data_dir

    request.check()
    data_dir = request.data_dir or default_data_dir()
    if request.resume:
        path, record = _reopen(request.resume, request.output_dir or Path("runs"))
        slots = [Slot(entry) for entry in record["variants"]]
        budget = Budget(**record["budget"])
        record["status"] = "running"
    else:
        path, record, slots, budget = _create(request)
    serial = record["order"] == "serial"
    status = "finished"
    with _Stop() as stop:
        try:
            for slot in slots:
                _open(slot, record, path, request.force, data_dir)
                _save(path, record)
                if stop.reason:
                    break
            slices = 0
            while not stop.reason and any(s.active for s in slots):
                for slot in [s for s in slots if s.active][: 1 if serial else None]:
                    _advance(slot, budget)
                    _save(path, record)
                    slices += 1
                    if slot.entry["status"] == "interrupted":     # the signal reached the trainer of this slice
                        stop.reason = stop.reason or slot.entry.get("message") or "interrupted"
                    if max_slices is not None and slices >= max_slices:
                        stop.reason = stop.reason or f"stopped after {slices} slices"
                    if stop.reason:
                        break
        finally:
            for slot in slots:
                if slot.active:
                    _pause(slot, stop.reason or "stopped")
            states = {s.entry["status"] for s in slots}
            status = ("interrupted" if stop.reason or "interrupted" in states or "pending" in states
                      else "failed" if states - {"finished"} else "finished")
            record["status"] = status
            record["stop_reason"] = stop.reason
            _save(path, record)
    return Outcome(status, record, path)


# ------------------------------------------------------------------------------------------------ record
def _create(request: Request):
    budget = Budget.parse(request.budget)
    cid = request.comparison_id or new_comparison_id()
    # every variant's W&B run in one group: the comparison's (the spec's logging.wandb.group, one home)
    shared = [*request.shared, f"logging.wandb.group={cid}"]
    if request.output_dir is not None:   # the variants' runs beside the comparison's record, where the view reads them
        shared.append(f"run.output_dir={request.output_dir}")
    variants = plan_variants(request.specs, request.vary, shared, request.seeds, budget.overrides)
    root = request.output_dir or Path(variants[0].resolved.spec.run.output_dir)
    roots = {Path(v.resolved.spec.run.output_dir) for v in variants}
    if request.output_dir is None and len(roots) > 1:
        raise ForgeError(f"the variants write to different run.output_dir ({', '.join(map(str, sorted(roots)))}); "
                         "give one with --output-dir")
    path = root / cid
    taken = [p for p in [path, *(root / f"{cid}-{v.name}" for v in variants)] if p.exists()]
    if taken:
        raise ForgeError(f"{taken[0]} already exists; give another --id, or continue it with --resume {cid}")
    keys = {held_out_key(v.resolved) for v in variants}
    record = {"format": FORMAT, "id": cid, "created": dt.datetime.now().isoformat(timespec="seconds"),
              "order": "serial" if request.serial else "round-robin", "budget": budget.to_json(),
              "specs": list(request.specs), "vary": list(request.vary), "shared_overrides": shared,
              "seeds": request.seeds, "machine": machine(), "same_held_out_batches": len(keys) == 1,
              "status": "running", "stop_reason": None,
              "variants": [{**v.record(), "run_id": f"{cid}-{v.name}", "group": _group(v, request.seeds),
                            "held_out": held_out_key(v.resolved), "budget_overrides": budget.overrides(v.resolved),
                            "status": "pending", "step": 0, "tokens": 0, "train_seconds": 0.0, "message": ""}
                           for v in variants]}
    path.mkdir(parents=True)
    _save(path, record)
    slots = [Slot(entry, resolved=v.resolved) for entry, v in zip(record["variants"], variants)]
    return path, record, slots, budget


def _group(variant: Variant, seeds: int) -> str:
    """The variant without its seed: the runs that --seeds repeats."""
    return variant.name.rsplit("_seed", 1)[0] if seeds > 1 else variant.name


def _reopen(cid: str, root: Path) -> tuple[Path, dict[str, Any]]:
    path = root / cid / RECORD
    if not path.is_file():
        raise ForgeError(f"no comparison {cid} under {root} ({path} not found)")
    record = read_json(path)
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("variants"), list):
        raise ForgeError(f"{path} is not a comparison record forge can continue (format {FORMAT})")
    return path.parent, record


def _save(path: Path, record: dict[str, Any]) -> None:
    write_json(path / RECORD, record)


# ------------------------------------------------------------------------------------------------ variants
def _open(slot: Slot, record: dict, path: Path, force: bool, data_dir: Path) -> None:
    """Gate (new) or reopen (resumed) the variant's run and set it up to its first slice."""
    from forge.spec.load import load_spec
    from forge.train import launch

    entry = slot.entry
    if entry["status"] in ("finished", "refused", "failed"):
        return
    root = path.parent
    run_dir = root / entry["run_id"]
    if run_dir.is_dir() and (run_dir / "lineage.json").is_file():
        slot.resolved, slot.run = launch.reopen(entry["run_id"], root)
        existing = any(slot.run.checkpoints.glob("step-*"))
    else:
        if slot.resolved is None:   # resumed before this variant had started
            slot.resolved = load_spec(Path(entry["spec"]), [*record["shared_overrides"], *entry["overrides"],
                                                            *entry["budget_overrides"]])
            if slot.resolved.hash != entry["spec_hash"]:
                _end(slot, "failed", f"{entry['spec']} changed since the comparison started (spec hash "
                                     f"{slot.resolved.hash[:12]} != recorded {entry['spec_hash'][:12]})")
                return
        ui.print_text(f"[{entry['name']}] checking {entry['spec']} {' '.join(entry['overrides'])}".rstrip())
        t0 = time.perf_counter()
        refused, slot.run = launch.start(slot.resolved, run_id=entry["run_id"], force=force, data_dir=data_dir)
        if refused:
            ui.render_checklist(refused.checklist, entry["spec"], slot.resolved.hash)
            _end(slot, "refused", refused.message)
            return
        ui.render_checklist_summary(slot.run.read("checklist.json"), time.perf_counter() - t0)
        existing = False
    slot.slices = launch.train_in_slices(slot.resolved, slot.run, resume=existing, max_steps=None,
                                         data_dir=data_dir, tty=False)
    _step(slot, None)
    if slot.active:
        entry["status"] = "running"


def _step(slot: Slot, target: int | None) -> None:
    """Send `target` (None: first set-up, or pause) to the variant's generator; record where it is."""
    entry = slot.entry
    try:
        slot.trainer = next(slot.slices) if slot.trainer is None and target is None else slot.slices.send(target)
    except StopIteration as done:
        result = done.value
        slot.trainer = result.trainer or slot.trainer   # a heal ([train.heal]) may have replaced it in the slice
        _account(slot)
        slot.trainer = None
        _end(slot, result.status, result.message)
        return
    except ForgeError as err:
        slot.trainer = None
        _end(slot, "failed", str(err))
        return
    _account(slot)


def _account(slot: Slot) -> None:
    trainer, entry = slot.trainer, slot.entry
    if trainer is None:
        return
    c = trainer.counters
    entry["train_seconds"] += trainer.train_seconds - slot.seen_seconds
    slot.seen_seconds = trainer.train_seconds
    entry["step"], entry["tokens"] = c.step, c.tokens


def _end(slot: Slot, status: str, message: str) -> None:
    slot.entry["status"], slot.entry["message"] = status, message
    ui.print_text(f"[{slot.entry['name']}] {status}{': ' + message if message else ''}")


def _advance(slot: Slot, budget: Budget) -> None:
    """One slice: to the next evaluation, or (minutes budget) less where the remaining seconds end sooner."""
    trainer, entry = slot.trainer, slot.entry
    spec = trainer.spec
    step, last = trainer.counters.step, spec.train.max_steps
    target = min((step // spec.train.eval_every + 1) * spec.train.eval_every, last)
    if budget.kind == "minutes":
        left = budget.seconds - entry["train_seconds"]
        if left <= 0:
            _pause(slot, None)
            return
        if slot.steps_here:
            per_step = slot.seconds_here / slot.steps_here
            target = min(target, step + max(1, round(left / per_step)))
        else:                         # no estimate yet: a short first slice
            target = min(target, step + spec.logging.every)
    before, seconds_before = step, entry["train_seconds"]
    _step(slot, target)
    if slot.trainer is None:
        return
    slot.steps_here += max(0, slot.trainer.counters.step - before)   # a heal's rollback ([train.heal]) goes back
    slot.seconds_here += entry["train_seconds"] - seconds_before
    if budget.kind == "minutes" and entry["train_seconds"] >= budget.seconds:
        _pause(slot, None)


def _pause(slot: Slot, reason: str | None) -> None:
    """End the variant's run at its checkpoint: interrupted (resumable) with `reason`; reason None: its budget
    is spent, the run is done (recorded finished in the comparison; the run's own status says where it
    stopped)."""
    if reason is not None:
        slot.trainer.stop_reason = reason
    else:
        slot.trainer.stop_reason = "the comparison's time budget is spent"
    _step(slot, None)
    if reason is None and slot.entry["status"] == "interrupted":
        slot.entry["status"] = "finished"
