"""`forge train` as one call: the command line's request -> a training run -> its outcome, rendered.

    request = TrainRequest(spec, overrides, ...)      # what the command line asked for (forge.cli.train)
    outcome = run_training(request)                   # the same call for one process, --nproc, plain torchrun
    outcome.render(); raise SystemExit(outcome.exit_code)

The spec is parsed once per process: a new run's SPEC here (forge.train.launch.start takes it resolved), a
resumed or attached run's own spec.toml by forge.train.launch.reopen (a SPEC given with --resume is read for
its run.output_dir only). A worker process (torchrun set RANK
and WORLD_SIZE) ends through forge.distributed.exit_worker (Outcome.worker).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from forge import ui
from forge.errors import ForgeError
from forge.train import launch


@dataclass(frozen=True)
class TrainRequest:
    spec: Optional[Path]
    overrides: list[str] = field(default_factory=list)
    run_id: Optional[str] = None
    resume: Optional[str] = None
    from_step: Optional[int] = None
    max_steps: Optional[int] = None
    nproc: Optional[int] = None
    force: bool = False
    data_dir: Optional[Path] = None
    attach: Optional[Path] = None
    heal: bool = False            # --heal: train.heal.enabled = true, recorded as an override

    @property
    def spec_overrides(self) -> list[str]:
        return [*self.overrides, *(["train.heal.enabled=true"] if self.heal else [])]

    def check(self) -> None:
        """Combinations of options that cannot work, before anything is read or written."""
        if self.from_step is not None and not self.resume:
            raise ForgeError("--from-step N needs --resume RUN_ID")
        if self.from_step is not None and self.nproc:
            raise ForgeError("--from-step is not supported with --nproc: resume from step N on one process first")
        if self.resume and self.overrides:
            raise ForgeError("--set cannot change a run being resumed; start a new run with the changed spec")
        if self.resume and self.heal:
            raise ForgeError("--heal cannot change a run being resumed: its spec says whether it heals "
                             "(train.heal.enabled); start a new run with --heal")


@dataclass
class Outcome:
    """What a `forge train` process ends with: its exit code and what it prints (render)."""
    exit_code: int
    render: Callable[[], None] = lambda: None
    worker: bool = False          # a torchrun worker: ends through forge.distributed.exit_worker


def run_training(request: TrainRequest) -> Outcome:
    from forge.checklist.context import default_data_dir
    from forge.distributed import launched_by_torchrun

    request.check()
    data_dir = request.data_dir or default_data_dir()
    if launched_by_torchrun():
        return _worker(request, data_dir)
    if request.attach is not None:
        raise ForgeError("--attach is internal to --nproc workers (torchrun sets RANK and WORLD_SIZE)")
    if request.resume:
        root = Path(_load(request.spec, []).spec.run.output_dir) if request.spec else Path("runs")
        resolved, run = launch.reopen(request.resume, root)
        _check_split(resolved, request.nproc)
    else:
        if request.spec is None:
            raise ForgeError("give a SPEC to start a run, or --resume RUN_ID to continue one")
        resolved = _load(request.spec, request.spec_overrides)
        _check_split(resolved, request.nproc)    # before the checklist and the run directory: nothing written
        t0 = time.perf_counter()
        with ui.working(f"checking {request.spec}: the before-first-run checklist (preparing the data, a real step)"):
            refused, run = launch.start(resolved, run_id=request.run_id, force=request.force, data_dir=data_dir)
        if refused:
            return Outcome(refused.exit_code, lambda: _render_refusal(refused, request.spec, resolved.hash))
        ui.render_checklist_summary(run.read("checklist.json"), time.perf_counter() - t0)
    if request.nproc:
        result = launch.launch_workers(run, request.nproc, resume=bool(request.resume), max_steps=request.max_steps,
                                       data_dir=data_dir)
        run.unlock()
    else:
        result = launch.train(resolved, run, resume=bool(request.resume), max_steps=request.max_steps,
                              data_dir=data_dir, from_step=request.from_step)
    return Outcome(result.exit_code, lambda: ui.render_run_end(result, run.path))


def _worker(request: TrainRequest, data_dir: Path) -> Outcome:
    if request.nproc:
        raise ForgeError("--nproc starts torchrun itself: do not combine it with torchrun")
    result, run, world, resolved = launch.run_worker(request.spec, request.spec_overrides, attach=request.attach,
                                                     resume=request.resume, run_id=request.run_id,
                                                     force=request.force, max_steps=request.max_steps,
                                                     data_dir=data_dir)
    render: Callable[[], None] = lambda: None
    if world.main and result.status == "refused":
        render = lambda: _render_refusal(result, request.spec, resolved.hash)   # noqa: E731
    elif world.main and request.attach is None:   # with --nproc the launching process reports
        render = lambda: ui.render_run_end(result, run.path)                     # noqa: E731
    return Outcome(result.exit_code, render, worker=True)


def _load(spec: Path, overrides: list[str]):
    from forge.spec import load

    return load.load_spec(spec, overrides)


def _check_split(resolved, nproc: Optional[int]) -> None:
    from forge.distributed import check_batch_split

    if nproc:
        check_batch_split(resolved.spec.data.batch_size, resolved.spec.data.grad_accum, nproc)
        if resolved.spec.train.heal.enabled:
            raise ForgeError("train.heal is not supported with --nproc yet: heal on one process")


def _render_refusal(result: launch.LaunchResult, spec: Optional[Path], spec_hash: str) -> None:
    ui.render_checklist(result.checklist, str(spec), spec_hash)
    ui.print_error(result.message)
