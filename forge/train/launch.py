"""`forge train`: gate the spec, set up (or reopen) the run directory, train, record the outcome."""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from forge import ui
from forge.checklist.runner import ChecklistResult, run_checklist
from forge.distributed import SINGLE, World
from forge.errors import ForgeError
from forge.spec.load import ResolvedSpec
from forge.spec.render import resolved_toml
from forge.train import checkpoint as ckpt
from forge.train.run_dir import RUN_FORMAT, RunDir, check_writable, environment, new_run_id

EXIT = {"finished": 0, "failed": 1, "interrupted": 130}


@dataclass
class LaunchResult:
    status: str                      # finished | failed | interrupted | refused
    run_id: str | None = None
    checklist: ChecklistResult | None = None
    message: str = ""
    crashed: bool = False            # an exception ended it (not a decision every rank took together)
    trainer: object = None           # the trainer it ended with (after a heal, not the one last yielded)

    @property
    def exit_code(self) -> int:
        return 1 if self.status == "refused" else EXIT[self.status]


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lineage(resolved: ResolvedSpec, force: bool) -> dict:
    from forge.data.cache import default_cache_dir
    from forge.data.sources import hub_commits

    return {"run_format": RUN_FORMAT, "spec_file": str(resolved.path), "spec_hash": resolved.hash,
            "chain": [{"path": str(p), "sha256": _file_sha256(p)} for p in resolved.chain],
            "overrides": list(resolved.overrides), "forced": force,
            "hub_commits": hub_commits(resolved.spec.data.sources, default_cache_dir())}


def start(resolved: ResolvedSpec, *, run_id: str | None, force: bool,
          data_dir: Path) -> tuple[LaunchResult | None, RunDir | None]:
    """Gate a new run of the resolved spec; create its directory. Returns (refusal, run dir). What can fail
    on the filesystem or the machine is checked before the checklist (which takes seconds), and a directory
    whose records cannot all be written is removed again."""
    from forge.spec.budget import check_memory_budget
    from forge.train.heal import healable_rules

    root = Path(resolved.spec.run.output_dir)
    check_writable(root)
    if run_id and (root / run_id).exists():
        raise ForgeError(f"run directory {root / run_id} already exists; resume it with --resume {run_id}")
    check_memory_budget(resolved.spec)
    healable_rules(resolved)            # [train.heal] modes name healable rules: exit 2 before the checklist
    result = run_checklist(resolved, data_dir=data_dir)
    if not result.ok and not force:
        failed = ", ".join(r.id for r in result.critical_failures)
        return LaunchResult("refused", None, result, f"critical checklist items failed: {failed} "
                                                     "(fix the spec, or --force to launch anyway)"), None
    run = RunDir.create(root, run_id or new_run_id(resolved.spec.run.name))
    try:
        run.lock()
        run.write("spec.toml", resolved_toml(resolved))
        run.write("lineage.json", lineage(resolved, force))
        run.write("checklist.json", result.to_json())
        run.set_status("running", step=0, spec_hash=resolved.hash)
    except BaseException as err:
        run.discard()
        if isinstance(err, OSError):
            raise ForgeError(f"cannot write the records of run {run.run_id} under {root}: {err} (check free space "
                             "and permissions)") from None
        raise
    return None, run


def reopen(run_id: str, output_dir: Path, lock: bool = True) -> tuple[ResolvedSpec, RunDir]:
    """The run's own resolved spec (what it ran with), verified against its recorded hash. lock=False: the
    workers of a distributed run, whose launching process holds the lock."""
    run = RunDir.open(output_dir, run_id)
    if lock:
        run.lock()
    try:
        return _verified_spec(run), run
    except BaseException:
        run.unlock()
        raise


def _verified_spec(run: RunDir) -> ResolvedSpec:
    resolved = run.resolved_spec()
    lineage_record = run.read("lineage.json") if (run.path / "lineage.json").is_file() else {}
    recorded = lineage_record.get("spec_hash") if isinstance(lineage_record, dict) else None
    if not isinstance(recorded, str):
        raise ForgeError(f"{run.path / 'lineage.json'} does not record the run's spec_hash; the run cannot be "
                         "checked against its spec: start a new run instead")
    if resolved.hash != recorded and not run.spec_migrated:
        raise ForgeError(f"{run.path / 'spec.toml'} was modified after the run started "
                         f"(hash {resolved.hash[:12]} != recorded {recorded[:12]}); start a new run instead")
    return resolved


def train(resolved: ResolvedSpec, run: RunDir, *, resume: bool, max_steps: int | None, data_dir: Path,
          tty: bool | None = None, world: World = SINGLE, from_step: int | None = None) -> LaunchResult:
    """Run (or continue) training in `run` until max_steps (default: train.max_steps): train_in_slices in one
    slice. Under torchrun every rank calls this with its `world`; rank 0 alone writes to the run directory."""
    slices = train_in_slices(resolved, run, resume=resume, max_steps=max_steps, data_dir=data_dir, tty=tty,
                             world=world, from_step=from_step)
    try:
        next(slices)
        while True:
            slices.send(sys.maxsize)
    except StopIteration as done:
        return done.value


def train_in_slices(resolved: ResolvedSpec, run: RunDir, *, resume: bool, max_steps: int | None, data_dir: Path,
                    tty: bool | None = None, world: World = SINGLE, from_step: int | None = None):
    """train() as a generator, so that several runs can take turns in one process (forge compare): it yields
    the Trainer once set up and after each slice; the caller sends the step to train until next (each slice
    ends with an evaluation and a checkpoint), or None to pause: the run ends interrupted at that checkpoint,
    resumable. Returns (StopIteration.value) the LaunchResult once the run has ended.

    A resume continues from the newest checkpoint that loads (or the one at `from_step`), walking back over
    those that do not with one line each. Until it has one nothing is written: a refused resume leaves the
    run as it was, and a new run refused by its data (--force past the checklist) leaves no directory.
    Under [train.heal] a slice that meets a healable finding heals the run (_healed) and goes on to its target
    with the trainer of the patched spec: the next yield gives that trainer."""
    from forge.train.components import build_components
    from forge.train.heal import close_outcome, make_healer, read_skipped
    from forge.train.live import LiveView
    from forge.train.loop import Trainer
    from forge.train.metrics_log import MetricsLog, NullMetricsLog
    from forge.train.monitors import MonitorSet, load_monitors

    spec = resolved.spec
    stop_at = min(max_steps or spec.train.max_steps, spec.train.max_steps)
    live = log = None
    main = world.main
    started = False      # past validation: from here on an error is recorded in the run
    try:
        candidates, skipped, kept = _resume_candidates(run, from_step) if resume else ([], [], "")
        if spec.train.heal.enabled and world.distributed:
            raise ForgeError("train.heal is not supported on several processes yet: heal on one process "
                             "(forge train --heal without --nproc)")
        healer = make_healer(resolved)   # train.heal.modes checked before the data is prepared
        with ui.working("preparing the data (cached after the first run) and building the model") if main \
                else contextlib.nullcontext():
            parts = build_components(spec, data_dir, world=world)
        parts.loader.skip = read_skipped(run)   # positions a heal set aside: never trained on, also on resume
        latest, resumed = _resume_point(run, parts, candidates, skipped, kept) if resume else (None, None)
        counters, window = resumed or (None, None)
        start_step = counters.step if counters else 0
        monitors = MonitorSet(load_monitors(spec.run.checklist))
        started = True
        if main:
            changes = run.add_launch(environment(spec.run.seed, str(parts.device), world.size,
                                                 parts.precision.record(), parts.data.fingerprints()))
            parts.data.tokenizer.save(run.path / "tokenizer.json")   # forge sample needs no data
        if latest is not None and main:
            _rewind(run, start_step, monitors)
        live = LiveView(run.run_id, start_step, stop_at, tty=tty, quiet=not main)
        for line in skipped:
            live.warn(line)
        if latest is not None and main:   # what differs from the launch before (environment.json records it)
            for line in changes:
                live.warn(f"changed since the last launch: {line}")
            if not changes:
                live.note("same code, environment and data as the last launch")
        live.note(f"precision: {parts.precision.describe()}")
        log = (MetricsLog(run.metrics_path, spec, run.run_id, run.path, run.read("lineage.json"), warn=live.warn)
               if main else NullMetricsLog())   # rank 0 alone writes records
        trainer = Trainer(resolved, run, parts, live, log, monitors, world, healer)
        if latest is not None:
            trainer.counters = counters
            trainer.loss_window.load_state_dict(window, parts.device)
            live.note(f"resumed {run.run_id} from {latest.name}"
                      + (f" on {world.size} processes" if world.distributed else ""))
        if main:
            run.set_status("running", step=start_step, world_size=world.size)
        target = yield trainer
        while target is not None:
            status = trainer.run_until(min(target, stop_at))
            while status == "heal":
                trainer, status = _healed(trainer, data_dir, world)
                status = status or trainer.run_until(min(target, stop_at))
            if status != "finished" or trainer.counters.step >= stop_at:
                break
            target = yield trainer
        else:
            status, trainer.stop_reason = "interrupted", trainer.stop_reason or "paused"
        c = trainer.counters
        why = {"failed": "error", "interrupted": "reason"}.get(status)
        if main:
            if status == "finished":
                close_outcome(run, f"recovered: finished at step {c.step}")
            run.set_status(status, step=c.step, tokens=c.tokens, nonfinite=c.nonfinite_total,
                           **({why: trainer.stop_reason} if why else {}))
        return LaunchResult(status, run.run_id, message=trainer.stop_reason or "", trainer=trainer)
    except (ForgeError, OSError, MemoryError) as err:
        error = err if isinstance(err, ForgeError) else ForgeError(_environment_error(err, run))
        if not started and not resume and main:
            run.discard()               # a new run that never started: no trace of it
        elif started and main:
            unwritten = run.try_set_status("failed", error=str(error))
            if unwritten:
                error = ForgeError(f"{error}\n  ({unwritten})")
        if error is err:
            raise
        raise error from None
    except BaseException as err:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        if not started and main and status == "interrupted":   # Ctrl-C while setting up: leave no trace
            if not resume:
                run.discard()
            return LaunchResult(status, run.run_id, message="interrupted before training started (nothing "
                                "was written)", crashed=True)
        error_file = run.path / ("error.txt" if main else f"error-rank{world.rank}.txt")
        try:
            run.write(error_file.name, traceback.format_exc())
            where = f"traceback in {error_file}"
        except OSError as write_error:
            where = f"no traceback written: {write_error}"
        message = f"{type(err).__name__}: {err} ({where})"
        if main:
            unwritten = run.try_set_status(status, error=message)
            message += f" ({unwritten})" if unwritten else ""
        return LaunchResult(status, run.run_id, message=message, crashed=True)
    finally:
        if log is not None:
            log.close()
        if live is not None:
            live.close()
        if main:
            run.unlock()


def _rewind(run: RunDir, step: int, monitors, log=None) -> None:
    """Continue from `step` (a resume, a heal's rollback): later checkpoints set aside, the records after it
    dropped (those steps run again; `log`, when open, reopens its file), the monitors fed what is left. The
    warnings after it go with the checkpoints set aside (they belong to the steps abandoned: kept as evidence,
    not shown as this run's, and not doubled when the monitors fire again on the steps trained again)."""
    from forge.probes.suite import SAMPLES
    from forge.train.metrics_log import read_metrics, truncate_after

    aside = _set_aside_later_checkpoints(run, step)
    if log is not None:
        log.rewind(step)
    else:
        truncate_after(run.metrics_path, step)
    if (run.path / SAMPLES).is_file():
        truncate_after(run.path / SAMPLES, step)
    warnings = run.path / "warnings.jsonl"
    dropped = truncate_after(warnings, step) if warnings.is_file() else []
    if dropped:
        aside = aside or _abandoned_dir(run, step)
        with open(aside / "warnings.jsonl", "a", encoding="utf-8") as f:
            f.writelines(json.dumps(w) + "\n" for w in dropped)
    for record in read_metrics(run.metrics_path):
        monitors.observe(record)


def _healed(trainer, data_dir: Path, world: World):
    """A finding of [train.heal] fired (trainer.finding): heal the run (forge.train.heal) and return the trainer
    that continues it under the patched spec, with None; or the same trainer and "failed" when the heal stops
    the run with the diagnosis (its stop_reason)."""
    from forge.train.heal import heal, make_healer
    from forge.train.loop import Trainer
    from forge.train.monitors import MonitorSet, load_monitors

    run, live, log = trainer.run, trainer.live, trainer.log
    trainer.wait_for_checkpoint()
    finding, step = trainer.finding, trainer.counters.step
    live.warn(f"[heal] {finding.rule.id} fired at step {step}: {finding.reason}")
    with ui.working(f"healing {run.run_id}: {finding.rule.id} (patch, checklist, rollback)"):
        done = heal(trainer.resolved, run, finding, step, trainer.healer, data_dir, log)
    if done.stop is not None:
        trainer.stop_reason = f"heal stopped the run: {done.stop}"
        return trainer, "failed"
    spec = done.resolved.spec
    monitors = MonitorSet(load_monitors(spec.run.checklist))
    _rewind(run, done.rollback_step, monitors, log)
    healed = Trainer(done.resolved, run, done.parts, live, log, monitors, world, make_healer(done.resolved))
    healed._timing = trainer._timing      # train_seconds go on (forge compare adds them per slice)
    if done.counters is not None:
        healed.counters = done.counters
        healed.loss_window.load_state_dict(done.window, done.parts.device)
    entry = run.read("lineage.json")["heals"][-1]
    live.note(f"healed: rolled back to step {done.rollback_step} ({entry['checkpoint']}), applied "
              f"{Path(entry['patch']['spec']).name} ({entry['patch']['rationale']}), "
              f"{len(entry['skipped_batches'])} batch(es) skipped")
    live.restart(done.rollback_step)
    run.set_status("running", step=done.rollback_step, spec_hash=done.resolved.hash)
    return healed, None


def _resume_candidates(run: RunDir, from_step: int | None) -> tuple[list[Path], list[str], str]:
    """The checkpoints of `run` that verify, newest first (only the one at `from_step`, if given), one line per
    checkpoint skipped, and the kept steps; ForgeError when none verifies. Runs before the components are
    built, so a run that cannot be resumed is refused at once."""
    skipped: list[str] = []
    found = list(reversed(ckpt.list_checkpoints(run.checkpoints, skipped.append)))
    kept = ", ".join(str(ckpt.step_of(p)) for p in reversed(found)) or "none"
    if from_step is not None:
        found = [p for p in found if ckpt.step_of(p) == from_step]
        if not found:
            raise ForgeError(f"run {run.run_id} has no checkpoint at step {from_step} (kept steps: {kept})")
    candidates = []
    for path in found:
        problem = ckpt.verify(path)
        if problem is None:
            candidates.append(path)
        else:
            skipped.append(f"skipping checkpoint {path.name}: {problem}")
    if not candidates:
        _no_resume(run, kept, skipped)
    return candidates, skipped, kept


def _resume_point(run: RunDir, parts, candidates: list[Path], skipped: list[str], kept: str):
    """(checkpoint, its counters): the first of `candidates` that restores into `parts`; a checkpoint that
    does not fit them adds its line to `skipped`."""
    from forge.train.loop import restore

    for path in candidates:
        try:
            return path, restore(parts, path)
        except ForgeError as err:
            skipped.append(f"skipping checkpoint {path.name}: {err}")
    _no_resume(run, kept, skipped)


def _no_resume(run: RunDir, kept: str, skipped: list[str]):
    lines = "".join(f"\n  {line}" for line in skipped)
    raise ForgeError(f"run {run.run_id} has no checkpoint to resume from that loads (kept steps: {kept}){lines}")


def _set_aside_later_checkpoints(run: RunDir, step: int) -> Path | None:
    """The checkpoints after the one resumed from (those a resume skipped, or the continuation abandoned by
    --from-step) move to <run>/abandoned/: kept, and out of the way of the steps about to be trained again.
    Returns the folder they went to (None: there were none)."""
    later = [p for p in ckpt.list_checkpoints(run.checkpoints, lambda _: None) if ckpt.step_of(p) > step]
    if not later:
        return None
    target = _abandoned_dir(run, step)
    for path in later:
        path.rename(target / path.name)
    return target


def _abandoned_dir(run: RunDir, step: int) -> Path:
    target = run.path / "abandoned" / f"after-step-{step}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    target.mkdir(parents=True, exist_ok=True)
    return target


def _environment_error(err: OSError | MemoryError, run: RunDir) -> str:
    if isinstance(err, MemoryError):
        return (f"out of memory in run {run.run_id}: reduce model size, data.batch_size or data.seq_len "
                "(the checkpoints written so far are intact)")
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    return (f"{err.strerror or err}{where} in run {run.run_id}: check free space and permissions under "
            f"{run.path.parent}, then resume with forge train --resume {run.run_id}")


# ------------------------------------------------------------------------------------------------ processes
def launch_workers(run: RunDir, nproc: int, *, resume: bool, max_steps: int | None, data_dir: Path) -> LaunchResult:
    """`forge train --nproc N`: start N workers on this machine through torch's own launcher (torchrun,
    standalone rendezvous, no restarts); they attach to `run`, whose lock this process holds, and rank 0
    writes it. Each worker gets an equal share of the CPU threads. Returns the run's outcome from its status."""
    from torch.distributed import run as torchrun

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "--local-ranks-filter=0",
            "-m", "forge", "train", "--attach", str(run.path), "--data-dir", str(data_dir)]
    args += ["--max-steps", str(max_steps)] if max_steps else []
    args += ["--resume", run.run_id] if resume else []
    failure = ""
    try:
        torchrun.main(args)
    except KeyboardInterrupt:
        failure = "interrupted while the workers ran"
    except Exception as err:   # torchrun's ChildFailedError: a worker exited non-zero (interrupted runs do too)
        failure = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    status = run.status() or {}
    if status.get("status", "running") == "running":   # the workers died before rank 0 recorded an outcome
        errors = sorted(p.name for p in run.path.glob("error*.txt"))
        message = f"worker processes failed ({failure or 'no outcome recorded'})" + \
                  (f"; see {', '.join(str(run.path / e) for e in errors)}" if errors else "")
        run.set_status("failed", error=message)
        return LaunchResult("failed", run.run_id, message=message)
    state = status["status"]
    return LaunchResult(state, run.run_id, message=status.get("error") or status.get("reason") or "")


def run_worker(spec_path: Path | None, overrides: list[str], *, attach: Path | None, resume: str | None,
               run_id: str | None, force: bool, max_steps: int | None,
               data_dir: Path) -> tuple[LaunchResult, RunDir | None, World, ResolvedSpec | None]:
    """One process of a distributed run (torchrun set RANK/WORLD_SIZE). With `attach` (forge train --nproc) the
    launching process created the run; otherwise (torchrun ... -m forge train SPEC, e.g. on several nodes)
    rank 0 gates the spec and creates or reopens the run, and every rank joins it by the id rank 0 sends.
    The run directory must be on a filesystem every node sees (resume reads the checkpoint on every rank).
    Each process parses one spec: SPEC for a new run (the run's spec.toml is its resolved form), else the
    run's spec.toml (and a SPEC given with --resume only for its run.output_dir). Returns the outcome, the
    run, the world and the resolved spec."""
    from forge import distributed
    from forge.spec import load

    if attach is not None:
        resolved, run = reopen(attach.name, attach.parent, lock=False)
        world = distributed.init_from_env(resolved.spec.train.device)
        return _train_worker(resolved, run, world, resume=bool(resume), max_steps=max_steps, data_dir=data_dir)
    if resume:
        root = Path(load.load_spec(spec_path).spec.run.output_dir) if spec_path else Path("runs")
        resolved, run = reopen(resume, root, lock=False)
    else:
        resolved, run = load.load_spec(spec_path, overrides), None
        root = Path(resolved.spec.run.output_dir)
    # what rank 0 tells the others: "run:<id>", "refused" (a critical checklist item failed) or "error"
    outcome, error, refused = "error", None, None
    if int(os.environ["RANK"]) == 0:
        # the gate before joining the process group: the checklist's real training step must not meet the
        # collectives of the other ranks (they wait in the group's rendezvous meanwhile)
        try:
            if resume:
                run.lock()
            else:
                refused, run = start(resolved, run_id=run_id, force=force, data_dir=data_dir)
            outcome = "refused" if refused else f"run:{run.run_id}"
        except ForgeError as err:
            error = err
    world = distributed.init_from_env(resolved.spec.train.device)
    outcome = distributed.broadcast_text(outcome)
    if not outcome.startswith("run:"):
        distributed.shutdown()
        if outcome == "refused":
            return (refused or LaunchResult("refused", message="rank 0's checklist refused the spec"), run, world,
                    resolved)
        raise error or ForgeError("rank 0 could not start the run (its output has the reason)")
    if not world.main and not resume:
        run = RunDir.open(root, outcome.removeprefix("run:"))   # rank 0 wrote SPEC's resolved form there
    return _train_worker(resolved, run, world, resume=bool(resume), max_steps=max_steps, data_dir=data_dir)


def _train_worker(resolved: ResolvedSpec, run: RunDir, world: World,
                  **kwargs) -> tuple[LaunchResult, RunDir, World, ResolvedSpec]:
    from forge import distributed

    result = train(resolved, run, world=world, **kwargs)
    if result.crashed:
        return result, run, world, resolved   # no barrier: the other ranks may be inside a collective
    distributed.shutdown()
    return result, run, world, resolved
