"""The run directory: runs/<run-id>/ holds everything one run produced, and a lock so only one
process writes it.

    spec.toml        the resolved spec (what ran), headed by its hash and lineage
    lineage.json     base spec file + hash, the extends chain, --set overrides, patches, --force
    environment.json python/torch/package versions, device, git commit + dirty flag, seed, argv
    checklist.json   the before-first-run checklist result
    metrics.jsonl    one JSON object per logging step (always written locally)
    warnings.jsonl   during-training checklist warnings
    status.json      running | finished | failed (with the error) | interrupted
    checkpoints/     step-NNNNNNN/ directories (see forge.train.checkpoint)
"""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import platform
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge.errors import ForgeError

STATUSES = ("running", "finished", "failed", "interrupted")


def new_run_id(name: str, now: dt.datetime | None = None) -> str:
    """Readable and unique: <name>-<YYYYmmdd-HHMMSS>-<6 hex>."""
    now = now or dt.datetime.now()
    return f"{name}-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file + fsync + rename: readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


class RunLocked(ForgeError):
    pass


@dataclass
class RunDir:
    path: Path

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    # -- lifecycle ------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path, run_id: str) -> "RunDir":
        path = root / run_id
        if path.exists():
            raise ForgeError(f"run directory {path} already exists; resume it with --resume {run_id}")
        path.mkdir(parents=True)
        (path / "checkpoints").mkdir()
        return cls(path)

    @classmethod
    def open(cls, root: Path, run_id: str) -> "RunDir":
        path = root / run_id
        if not (path / "status.json").is_file():
            known = sorted(p.name for p in root.glob("*") if (p / "status.json").is_file()) if root.is_dir() else []
            hint = f"; runs in {root}: {', '.join(known[-5:])}" if known else f"; no runs in {root}"
            raise ForgeError(f"no run {run_id!r} in {root}{hint}")
        return cls(path)

    def lock(self) -> None:
        """Hold an exclusive lock for the life of this process (released by the OS on exit or kill)."""
        self._lock_file = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise RunLocked(f"run {self.run_id} is being written by another process (lock {self.path / '.lock'})") \
                from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"{os.getpid()}\n")
        self._lock_file.flush()

    def unlock(self) -> None:
        lock_file = getattr(self, "_lock_file", None)
        if lock_file is not None:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
            lock_file.close()
            self._lock_file = None

    # -- records --------------------------------------------------------------------------------
    def set_status(self, status: str, **fields: Any) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        previous = self.status() or {}
        record = {**previous, **fields, "status": status,
                  "updated": dt.datetime.now().isoformat(timespec="seconds")}
        if status == "running":
            record.pop("error", None)
        write_json(self.path / "status.json", record)

    def status(self) -> dict | None:
        path = self.path / "status.json"
        return read_json(path) if path.is_file() else None

    def append_warning(self, warning: dict[str, Any]) -> None:
        """During-training checklist warnings, one JSON object per line (warnings.jsonl)."""
        with open(self.path / "warnings.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(warning) + "\n")

    def warnings(self) -> list[dict[str, Any]]:
        path = self.path / "warnings.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def write(self, name: str, obj: Any) -> None:
        if isinstance(obj, str):
            write_atomic(self.path / name, obj)
        else:
            write_json(self.path / name, obj)

    def read(self, name: str) -> Any:
        return read_json(self.path / name)


def environment(seed: int, device: str, world_size: int = 1, precision: dict | None = None) -> dict[str, Any]:
    """What a reader needs to reproduce the run: versions, device, the precision it computes in
    (forge.train.precision's record), code revision, seed, command."""
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("torch", "pydantic", "tokenizers", "datasets", "safetensors", "wandb", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "device": device,
        "cuda_device": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "torch_threads": torch.get_num_threads(),
        "world_size": world_size,
        "precision": precision,
        "git": git_revision(),
        "seed": seed,
        "argv": sys.argv,
    }


def git_revision(repo: Path | None = None) -> dict[str, Any]:
    repo = repo or Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(dirty) if commit else None}
