"""`forge train`: gate the spec, set up (or reopen) the run directory, train, record the outcome."""
from __future__ import annotations

import hashlib
import traceback
from dataclasses import dataclass
from pathlib import Path

from forge.checklist.runner import ChecklistResult, run_checklist
from forge.errors import ForgeError
from forge.spec.load import ResolvedSpec, load_spec
from forge.spec.render import resolved_toml
from forge.train import checkpoint as ckpt
from forge.train.run_dir import RunDir, environment, new_run_id

EXIT = {"finished": 0, "failed": 1, "interrupted": 130}


@dataclass
class LaunchResult:
    status: str                      # finished | failed | interrupted | refused
    run_id: str | None = None
    checklist: ChecklistResult | None = None
    message: str = ""

    @property
    def exit_code(self) -> int:
        return 1 if self.status == "refused" else EXIT[self.status]


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lineage(resolved: ResolvedSpec, force: bool) -> dict:
    return {"spec_file": str(resolved.path), "spec_hash": resolved.hash,
            "chain": [{"path": str(p), "sha256": _file_sha256(p)} for p in resolved.chain],
            "overrides": list(resolved.overrides), "forced": force}


def start(spec_path: Path, overrides: list[str], *, run_id: str | None, force: bool,
          data_dir: Path) -> tuple[LaunchResult | None, ResolvedSpec, RunDir | None]:
    """Validate and gate a new run; create its directory. Returns (refusal, resolved, run dir)."""
    resolved = load_spec(spec_path, overrides)
    result = run_checklist(resolved, data_dir=data_dir)
    if not result.ok and not force:
        failed = ", ".join(r.id for r in result.critical_failures)
        return LaunchResult("refused", None, result, f"critical checklist items failed: {failed} "
                                                     "(fix the spec, or --force to launch anyway)"), resolved, None
    root = Path(resolved.spec.run.output_dir)
    run = RunDir.create(root, run_id or new_run_id(resolved.spec.run.name))
    run.lock()
    run.write("spec.toml", resolved_toml(resolved))
    run.write("lineage.json", lineage(resolved, force))
    run.write("checklist.json", result.to_json())
    run.set_status("running", step=0, spec_hash=resolved.hash)
    return None, resolved, run


def reopen(run_id: str, output_dir: Path) -> tuple[ResolvedSpec, RunDir]:
    """The run's own resolved spec (what it ran with), verified against its recorded hash."""
    run = RunDir.open(output_dir, run_id)
    run.lock()
    resolved = load_spec(run.path / "spec.toml")
    recorded = run.read("lineage.json")["spec_hash"]
    if resolved.hash != recorded:
        raise ForgeError(f"{run.path / 'spec.toml'} was modified after the run started "
                         f"(hash {resolved.hash[:12]} != recorded {recorded[:12]}); start a new run instead")
    return resolved, run


def train(resolved: ResolvedSpec, run: RunDir, *, resume: bool, max_steps: int | None, data_dir: Path,
          tty: bool | None = None) -> LaunchResult:
    """Run (or continue) training in `run` until max_steps (default: train.max_steps)."""
    from forge.train.components import build_components
    from forge.train.live import LiveView
    from forge.train.loop import Trainer
    from forge.train.metrics_log import MetricsLog, read_metrics, truncate_after
    from forge.train.monitors import MonitorSet, load_monitors
    from forge.probes.suite import SAMPLES

    spec = resolved.spec
    stop_at = min(max_steps or spec.train.max_steps, spec.train.max_steps)
    live = log = None
    try:
        parts = build_components(spec, data_dir)
        run.write("environment.json", environment(spec.run.seed, str(parts.device)))
        parts.data.tokenizer.save(run.path / "tokenizer.json")   # forge sample needs no data
        latest = ckpt.latest_valid(run.checkpoints) if resume else None
        if resume and latest is None:
            raise ForgeError(f"run {run.run_id} has no valid checkpoint to resume from")
        start_step = ckpt.read_meta(latest)["step"] if latest else 0
        monitors = MonitorSet(load_monitors(spec.run.checklist))
        if latest is not None:
            truncate_after(run.metrics_path, start_step)  # the steps after the checkpoint run again
            if (run.path / SAMPLES).is_file():
                truncate_after(run.path / SAMPLES, start_step)
            for record in read_metrics(run.metrics_path):
                monitors.observe(record)
        live = LiveView(run.run_id, start_step, stop_at, tty=tty)
        log = MetricsLog(run.metrics_path, spec.logging.wandb, run.run_id, run.path,
                         spec.model_dump(mode="json"), warn=live.warn)
        trainer = Trainer(resolved, run, parts, live, log, monitors)
        if latest is not None:
            trainer.restore(latest)
            live.note(f"resumed {run.run_id} from {latest.name}")
        run.set_status("running", step=start_step)
        status = trainer.run_until(stop_at)
        c = trainer.counters
        why = {"failed": "error", "interrupted": "reason"}.get(status)
        run.set_status(status, step=c.step, tokens=c.tokens, nonfinite=c.nonfinite_total,
                       **({why: trainer.stop_reason} if why else {}))
        return LaunchResult(status, run.run_id, message=trainer.stop_reason or "")
    except ForgeError as err:
        run.set_status("failed", error=str(err))
        raise
    except BaseException as err:
        run.write("error.txt", traceback.format_exc())
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        message = f"{type(err).__name__}: {err} (traceback in {run.path / 'error.txt'})"
        run.set_status(status, error=message)
        return LaunchResult(status, run.run_id, message=message)
    finally:
        if log is not None:
            log.close()
        if live is not None:
            live.close()
        run.unlock()
