"""Fault injection: attack a tiny run the way a careful user would, and check that every attack leaves it
resumable from a finite checkpoint, with no traceback.

    .venv/bin/python benchmarks/fault_injection.py [--kills 20] [--seed 0] [--keep DIR]

1. kill -9 at random moments, half of them while a checkpoint is being written (the moment a temporary
   checkpoint directory appears, plus a random 0-40 ms); each next launch is itself a resume of the killed run.
2. the newest checkpoint corrupted in 6 ways that a checksum check alone does not all catch (the manifest is
   recomputed where noted), beside a stray step-NNNNNNN.bak directory: the resume must walk back.
3. non-finite injection in 3 ways (NaN loss, lr = inf, Grokfast lam = 1e38, each for 3 steps) in a live
   trainer: no checkpoint may hold a non-finite tensor, the counters must agree, and the run must resume.

Uses the tiny spec on the built-in corpus (CPU, no data files). Writes benchmarks/results/fault_injection.json.
Exit status 1 if any check failed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, setup_threads, table, write_result

FORGE = [sys.executable, "-m", "forge"]
SETTINGS = ["train.max_steps=100000", "train.eval_every=100000", "logging.every=1", "checkpoint.every=1",
            "checkpoint.keep_last_n=2", "merge_preview.enabled=false", "probes.enabled=false",
            "data.eval.max_batches=1", "logging.wandb.mode=disabled"]
RUN = "attacked"


def forge(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*FORGE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def newest_step(run: Path) -> int:
    from forge.train import checkpoint as ckpt

    latest = ckpt.latest_valid(run / "checkpoints", report=lambda _: None)
    return ckpt.step_of(latest) if latest else -1


def resumable(run: Path) -> str | None:
    """None when the newest checkpoint that verifies (content and finiteness included) exists."""
    return None if newest_step(run) >= 0 else "no checkpoint verifies"


# --------------------------------------------------------------------------------------------- 1. kill -9
def kill_once(cwd: Path, rng: random.Random, during_write: bool) -> dict:
    run = cwd / "runs" / RUN
    before = newest_step(run)
    out = open(cwd / "kill.log", "w")
    proc = subprocess.Popen([*FORGE, "train", "--resume", RUN], cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    started = time.perf_counter()
    in_write = False
    if during_write:   # wait for a write to begin (a hidden .tmp-step-* directory), then kill inside it
        while time.perf_counter() - started < 120 and proc.poll() is None:
            if any((run / "checkpoints").glob(".tmp-*")):
                time.sleep(rng.uniform(0, 0.04))
                in_write = any((run / "checkpoints").glob(".tmp-*"))
                break
            time.sleep(0.002)
    else:
        time.sleep(rng.uniform(0.5, 8.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out.close()
    log = (cwd / "kill.log").read_text()
    problem = resumable(run)
    if "Traceback" in log:
        problem = "traceback in the output"
    return {"mode": "in checkpoint write" if during_write else "random", "in_write": in_write,
            "resumed_from": before, "newest_after": newest_step(run), "problem": problem}


# --------------------------------------------------------------------------------------------- 2. corruption
def _rewrite(path: Path, name: str, data: bytes) -> None:
    (path / name).write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / "manifest.json").write_text(json.dumps(manifest))


def _nan_weights(path: Path) -> bytes:
    from safetensors.torch import load_file, save

    weights = load_file(str(path / "model.safetensors"))
    next(t for t in weights.values() if t.is_floating_point()).view(-1)[0] = float("nan")
    return save(weights)


def _flip(path: Path) -> None:
    with open(path / "model.safetensors", "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(b"\xff" * 8)


CORRUPTIONS = {
    "truncated weights, checksum recomputed": lambda p: _rewrite(p, "model.safetensors",
                                                                 (p / "model.safetensors").read_bytes()[:4096]),
    "garbage meta.json, checksum recomputed": lambda p: _rewrite(p, "meta.json", b"\x00{not json"),
    "manifest {\"files\": {}}": lambda p: (p / "manifest.json").write_text('{"files": {}}'),
    "NaN in the weights, checksum recomputed": lambda p: _rewrite(p, "model.safetensors", _nan_weights(p)),
    "state.pt not a pickle, checksum recomputed": lambda p: _rewrite(p, "state.pt", b"PK\x03\x04 junk"),
    "flipped bytes (checksum mismatch)": _flip,
}


def corrupt_once(cwd: Path, kind: str) -> dict:
    from forge.train import checkpoint as ckpt

    src = cwd / "runs" / RUN
    case = cwd / "corrupt" / "runs" / RUN
    shutil.rmtree(case.parent.parent, ignore_errors=True)
    shutil.copytree(src, case)
    (case / ".lock").unlink(missing_ok=True)
    kept = ckpt.list_checkpoints(case / "checkpoints", report=lambda _: None)
    newest = kept[-1]
    CORRUPTIONS[kind](newest)
    (case / "checkpoints" / f"{newest.name}.bak").mkdir()
    step = ckpt.step_of(newest)
    done = forge(case.parent.parent, "train", "--resume", RUN, "--max-steps", str(step + 1))
    log = done.stdout + done.stderr
    problem = None
    if done.returncode != 0:
        problem = f"exit {done.returncode}: {log.strip().splitlines()[-1] if log.strip() else ''}"
    elif f"skipping checkpoint {newest.name}" not in log:
        problem = "the corrupted checkpoint was not reported"
    elif "not a checkpoint" not in log:
        problem = "the stray directory was not reported"
    elif "Traceback" in log:
        problem = "traceback in the output"
    else:
        problem = resumable(case)
    return {"kind": kind, "corrupted_step": step, "resumed_from": step - 1 if problem is None else None,
            "problem": problem}


# --------------------------------------------------------------------------------------------- 3. non-finite
def inject_once(cwd: Path, kind: str, steps: int = 3) -> dict:
    """A live trainer on a copy of the run, poisoned for `steps` consecutive steps, then trained on."""
    import torch

    from forge.train import checkpoint as ckpt
    from forge.train.components import build_components
    from forge.train.launch import reopen
    from forge.train.live import LiveView
    from forge.train.loop import Trainer
    from forge.train.metrics_log import MetricsLog
    from forge.train.monitors import MonitorSet

    case = cwd / "nonfinite" / "runs" / RUN
    shutil.rmtree(case.parent.parent, ignore_errors=True)
    shutil.copytree(cwd / "runs" / RUN, case)
    (case / ".lock").unlink(missing_ok=True)
    resolved, run = reopen(RUN, case.parent, lock=False)
    parts = build_components(resolved.spec, cwd)
    live = LiveView(RUN, 0, 0, tty=False, quiet=True)
    log = MetricsLog(run.metrics_path, resolved.spec, RUN, run.path, {}, live.warn)
    trainer = Trainer(resolved, run, parts, live, log, MonitorSet([]))
    trainer.restore(ckpt.latest_valid(run.checkpoints, report=lambda _: None))
    start, nonfinite_before = trainer.counters.step, trainer.counters.nonfinite_total
    opt = parts.optimizer

    def nan_loss(module, args, output):
        if module.training:
            output.loss = output.loss * float("nan")
        return output

    trainer.run_until(start + 1)                      # one clean step first
    if kind == "NaN loss":
        hook = parts.model.register_forward_hook(nan_loss)
    elif kind == "lr = inf":
        base = [g["base_lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["base_lr"] = float("inf")
        parts.schedule.load_state_dict(parts.schedule.state_dict())   # the lr of the next step, from base_lr
    else:
        lam, opt.grokfast.lam = opt.grokfast.lam, 1e38
    trainer.run_until(start + 1 + steps)
    if kind == "NaN loss":
        hook.remove()
    elif kind == "lr = inf":
        for g, b in zip(opt.param_groups, base):
            g["base_lr"] = b
        parts.schedule.load_state_dict(parts.schedule.state_dict())
    else:
        opt.grokfast.lam = lam
    status = trainer.run_until(start + 2 + steps + 2)
    log.close()
    kept = ckpt.list_checkpoints(run.checkpoints, report=lambda _: None)
    bad = [p.name for p in kept if ckpt.verify(p) is not None]
    finite = all(bool(torch.isfinite(p).all()) for p in parts.model.parameters())
    c = trainer.counters
    added = c.nonfinite_total - nonfinite_before
    problem = None
    if status != "finished":
        problem = f"status {status}: {trainer.stop_reason}"
    elif bad:
        problem = f"checkpoints that do not verify: {bad}"
    elif not finite:
        problem = "non-finite weights"
    elif added != steps or c.nonfinite_total != opt.skipped_steps:
        problem = (f"counters: {added} non-finite steps counted for {steps} poisoned; nonfinite_total "
                   f"{c.nonfinite_total}, optimizer skipped_steps {opt.skipped_steps}")
    if problem is None:
        done = forge(case.parent.parent, "train", "--resume", RUN, "--max-steps", str(c.step + 1))
        if done.returncode != 0 or "Traceback" in done.stdout + done.stderr:
            problem = f"resume after the injection: exit {done.returncode}"
    return {"kind": kind, "steps_poisoned": steps, "nonfinite_counted": added,
            "skipped_steps": opt.skipped_steps, "checkpoints_verified": len(kept) - len(bad), "problem": problem}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="Work in this directory and keep it (default: a temporary one).")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")   # the forge processes it starts: tiny shapes, one thread
    setup_threads(1)                                # and the trainer in this process (torch is imported)
    rng = random.Random(args.seed)
    cwd = args.keep or Path(tempfile.mkdtemp(prefix="forge-faults-"))
    cwd.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FORGE_CACHE_DIR", str(cwd / "cache"))
    t0 = time.perf_counter()
    first = forge(cwd, "train", str(ROOT / "specs" / "tiny.toml"), "--force", "--run-id", RUN, "--max-steps", "2",
                  *[x for s in SETTINGS for x in ("--set", s)])
    if first.returncode != 0:
        sys.exit(f"the first run failed: {first.stderr[-2000:]}")
    seconds = {"first run (checklist included)": time.perf_counter() - t0}
    t = time.perf_counter()
    kills = [kill_once(cwd, rng, during_write=i % 2 == 0) for i in range(args.kills)]
    final = forge(cwd, "train", "--resume", RUN, "--max-steps", str(newest_step(cwd / "runs" / RUN) + 1))
    seconds["kills and the resume after them"], t = time.perf_counter() - t, time.perf_counter()
    corruptions = [corrupt_once(cwd, kind) for kind in CORRUPTIONS]
    seconds["corruptions"], t = time.perf_counter() - t, time.perf_counter()
    injections = [inject_once(cwd, kind) for kind in ("NaN loss", "lr = inf", "Grokfast lam = 1e38")]
    seconds["non-finite injections"] = time.perf_counter() - t
    failed = [r for r in kills + corruptions + injections if r["problem"]]
    if final.returncode != 0 or "Traceback" in final.stdout + final.stderr:
        failed.append({"problem": f"the resume after the kills: exit {final.returncode}"})
    summary = {
        "kills": len(kills), "kills_in_checkpoint_write": sum(r["in_write"] for r in kills),
        "kills_resumable": sum(r["problem"] is None for r in kills),
        "resumed_after_kills": final.returncode == 0,
        "corruptions": len(corruptions), "corruptions_walked_back": sum(r["problem"] is None for r in corruptions),
        "injections": len(injections), "injections_clean": sum(r["problem"] is None for r in injections),
        "failed": failed, "seconds": round(time.perf_counter() - t0, 1),
        "seconds_by_phase": {k: round(v, 1) for k, v in seconds.items()},
    }
    print(table(["attack", "count", "ok"], [
        ["kill -9 (random moment)", sum(r["mode"] == "random" for r in kills),
         sum(r["mode"] == "random" and r["problem"] is None for r in kills)],
        ["kill -9 (in a checkpoint write)", sum(r["mode"] != "random" for r in kills),
         sum(r["mode"] != "random" and r["problem"] is None for r in kills)],
        ["  of which a .tmp write was under way", summary["kills_in_checkpoint_write"], ""],
        *[[f"corrupt newest: {r['kind']}", 1, int(r["problem"] is None)] for r in corruptions],
        *[[f"non-finite: {r['kind']} x{r['steps_poisoned']}", 1, int(r["problem"] is None)] for r in injections],
    ]))
    print(f"{len(failed)} failed; {summary['seconds']} s ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}); "
          f"work dir {cwd}")
    for f in failed:
        print("  FAILED:", f)
    write_result("fault_injection", {"seed": args.seed, "summary": summary, "kills": kills,
                                     "corruptions": corruptions, "injections": injections})
    if not args.keep:
        shutil.rmtree(cwd, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
