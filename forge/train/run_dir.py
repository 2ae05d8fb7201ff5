"""The run directory: runs/<run-id>/ holds everything one run produced, and a lock so only one
process writes it.

    spec.toml        the resolved spec (what ran), headed by its hash and lineage
    lineage.json     base spec file + hash, the extends chain, --set overrides, patches, --force, and the
                     run format (run_format) the directory is written in
    environment.json one record per launch (the start and every resume): python/torch/package versions,
                     forge version, device, git commit + dirty flag, seed, argv
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
from typing import Any, Callable

from forge.errors import ForgeError

STATUSES = ("running", "finished", "failed", "interrupted")

# The layout of a run directory, versioned so that a newer forge reads older runs (migrating what changed)
# and an older forge refuses newer ones by name instead of misreading them.
#   1  (no run_format in lineage.json) environment.json is one object: the first launch only
#   2  lineage.json states run_format; environment.json is a list with one record per launch
RUN_FORMAT = 2
# run_format -> how to bring that format's spec.toml data up to the next format (before validation). A
# schema change that adds a required key adds an entry here with the value that keeps older runs' meaning.
SPEC_MIGRATIONS: dict[int, Callable[[dict], None]] = {1: lambda data: None}


def new_run_id(name: str, now: dt.datetime | None = None) -> str:
    """Readable and unique: <name>-<YYYYmmdd-HHMMSS>-<6 hex>."""
    now = now or dt.datetime.now()
    return f"{name}-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file + fsync + rename: readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:   # a full or read-only disk: leave the old file, and no temporary one
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    """The JSON in `path`; a file that cannot be read or parsed is a ForgeError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, ValueError) as err:
        raise ForgeError(f"cannot read {path}: {type(err).__name__}: {err} (restore the file or remove the run "
                         "directory)") from None


class RunLocked(ForgeError):
    pass


def check_writable(directory: Path) -> None:
    """ForgeError unless `directory` is (or can be created as) a writable directory. Creates nothing: runs
    before the checklist, so that a bad output_dir is reported at once and leaves no trace."""
    path = directory
    while not path.exists():
        if path == path.parent:
            break
        path = path.parent
    if not path.is_dir():
        raise ForgeError(f"{path} is not a directory (run.output_dir = {str(directory)!r}); set run.output_dir "
                         "to a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ForgeError(f"{path} is not writable (run.output_dir = {str(directory)!r}); fix its permissions or "
                         "set run.output_dir elsewhere")


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
        """A new run directory; discard() removes it again (and `root`, if this created it)."""
        path = root / run_id
        if path.exists():
            raise ForgeError(f"run directory {path} already exists; resume it with --resume {run_id}")
        created_root = not root.exists()
        try:
            path.mkdir(parents=True)
            (path / "checkpoints").mkdir()
        except OSError as err:
            raise ForgeError(f"cannot create the run directory {path}: {err.strerror or err} (check "
                             "run.output_dir and its permissions)") from None
        run = cls(path)
        run._created = (path, root if created_root else None)
        return run

    def discard(self) -> None:
        """Remove a run directory that create() made in this process, before it held any result (bad input
        found after creation, e.g. by --force past the checklist): nothing is left of it."""
        import shutil

        created = getattr(self, "_created", None)
        if created is None:
            return
        self.unlock()
        shutil.rmtree(created[0], ignore_errors=True)
        if created[1] is not None:
            try:
                created[1].rmdir()      # only if empty
            except OSError:
                pass
        self._created = None

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
        try:
            self._lock_file = open(self.path / ".lock", "a+")
        except OSError as err:
            raise ForgeError(f"cannot open the lock file {self.path / '.lock'}: {err.strerror or err} (it must be "
                             "a writable file; remove it if it is a directory, or fix the run directory's "
                             "permissions)") from None
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

    def lock_held(self) -> bool:
        """Whether a live process (another one) holds this run's lock: a "running" run without one is stale."""
        path = self.path / ".lock"
        if not path.is_file():
            return False
        with open(path, "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False

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
        if not path.is_file():
            return None
        record = read_json(path)
        if not isinstance(record, dict):
            raise ForgeError(f"{path} is not a status record (a JSON object)")
        return record

    def try_set_status(self, status: str, **fields: Any) -> str | None:
        """set_status where the run is ending on an error: a status that cannot be written (a read-only or full
        disk) must not hide the error itself. Returns why it was not written, or None."""
        try:
            self.set_status(status, **fields)
        except (OSError, ForgeError) as err:
            return f"status.json not updated: {err}"
        return None

    # -- format ---------------------------------------------------------------------------------
    def run_format(self) -> int:
        path = self.path / "lineage.json"
        lineage = read_json(path) if path.is_file() else {}
        found = lineage.get("run_format", 1) if isinstance(lineage, dict) else 1
        if not isinstance(found, int) or found > RUN_FORMAT:
            by = self.written_by() or "of a newer release"
            raise ForgeError(f"run {self.run_id} has run format {found!r}; this forge ({_forge_version()}) reads "
                             f"formats up to {RUN_FORMAT}: read it with forge {by}")
        return found

    def written_by(self) -> str | None:
        """The forge version of the run's latest launch that recorded one."""
        versions = [launch.get("forge") for launch in self.launches(check=False)]
        return next((v for v in reversed(versions) if isinstance(v, str)), None)

    def launches(self, check: bool = True) -> list[dict[str, Any]]:
        """environment.json: one record per launch, oldest first (format 1 held the first launch only)."""
        if check:
            self.run_format()
        path = self.path / "environment.json"
        if not path.is_file():
            return []
        data = read_json(path)
        if isinstance(data, dict):
            return [data]
        return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []

    def add_launch(self, record: dict[str, Any]) -> list[str]:
        """Append this launch to environment.json (call it once the launch is known to be valid), with what
        changed since the previous launch (`changes`: launch_changes; a resume prints them). Returns them."""
        launches = self.launches()
        record = {**record, "changes": launch_changes(launches[-1], record) if launches else []}
        write_json(self.path / "environment.json", [*launches, record])
        return record["changes"]

    def spec_data(self) -> dict[str, Any]:
        """The run's resolved spec as a plain dict, migrated to the current run format: what diagnose and
        report read. ForgeError naming the file when it is missing or unreadable."""
        import tomllib

        path = self.path / "spec.toml"
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ForgeError(f"run {self.run_id} has no spec.toml ({path}): it was not started by forge train, "
                             "or the file was removed; restore it from the run's lineage.json spec_file") from None
        except (OSError, UnicodeError, tomllib.TOMLDecodeError) as err:
            raise ForgeError(f"cannot read {path}: {type(err).__name__}: {err}") from None
        self.migrate_spec(data)
        return data

    def migrate_spec(self, data: dict[str, Any]) -> bool:
        """Bring spec data of this run's format up to RUN_FORMAT in place; True if anything changed."""
        before = json.dumps(data, sort_keys=True, default=str)
        for version in range(self.run_format(), RUN_FORMAT):
            SPEC_MIGRATIONS[version](data)
        return json.dumps(data, sort_keys=True, default=str) != before

    def resolved_spec(self):
        """The run's spec.toml validated (after migration), as forge.spec.load.ResolvedSpec; spec_migrated says
        whether a migration changed it. A spec this forge cannot validate is a SpecError that names the run
        format and the forge version that wrote it."""
        from forge.errors import SpecError
        from forge.spec.load import load_spec

        path = self.path / "spec.toml"
        if not path.is_file():
            self.spec_data()   # raises the missing-file error
        migrated = {}

        def migrate(data: dict) -> None:
            migrated["changed"] = self.migrate_spec(data)

        try:
            resolved = load_spec(path, migrate=migrate)
        except SpecError as err:
            by = self.written_by()
            raise SpecError(err.problems, header=f"the spec of run {self.run_id} (run format {self.run_format()}"
                            f"{', written by forge ' + by if by else ''}) does not validate with forge "
                            f"{_forge_version()}: read it with the forge that wrote it") from None
        self.spec_migrated = bool(migrated.get("changed"))
        return resolved

    def append_warning(self, warning: dict[str, Any]) -> None:
        """During-training checklist warnings, one JSON object per line (warnings.jsonl)."""
        with open(self.path / "warnings.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(warning) + "\n")

    def warnings(self) -> list[dict[str, Any]]:
        """warnings.jsonl's records; unreadable lines are skipped (forge diagnose counts and shows them)."""
        from forge.metrics.jsonl import read_objects

        return read_objects(self.path / "warnings.jsonl").records

    def write(self, name: str, obj: Any) -> None:
        if isinstance(obj, str):
            write_atomic(self.path / name, obj)
        else:
            write_json(self.path / name, obj)

    def read(self, name: str) -> Any:
        return read_json(self.path / name)


def environment(seed: int, device: str, world_size: int = 1, precision: dict | None = None,
                data: dict | None = None) -> dict[str, Any]:
    """What a reader needs to reproduce the run: versions, device, the precision it computes in
    (forge.train.precision's record), code revision, the data's fingerprints (forge.data.Data.fingerprints),
    seed, command."""
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("torch", "pydantic", "tokenizers", "datasets", "safetensors", "wandb", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "forge": _forge_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "device": device,
        "cuda_device": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "torch_threads": torch.get_num_threads(),
        "world_size": world_size,
        "precision": precision,
        "git": git_revision(),
        "data": data,
        "seed": seed,
        "argv": sys.argv,
    }


# What a resume compares with the previous launch: the code, the environment and the data (the spec itself is
# compared by its hash and a changed one refused: forge.train.launch). Measured figures (the precision's matmul
# peaks), the command line and the time are not compared.
COMPARED = ("forge", "git.commit", "git.dirty", "python", "platform", "packages", "device", "cuda_device",
            "torch_threads", "world_size", "precision.name", "precision.capability", "data")


def launch_changes(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per COMPARED field that differs between two launch records ("key: old -> new"); a field the
    previous launch did not record (an older forge) is named once as not comparable."""
    def leaves(record: dict, key: str) -> dict[str, Any]:
        node: Any = record
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return {}
            node = node[part]
        if isinstance(node, dict):
            return {f"{key}.{k}": v for sub, value in node.items() for k, v in leaves({sub: value}, sub).items()}
        return {key: node}

    lines, unrecorded = [], []
    for key in COMPARED:
        old, new = leaves(previous, key), leaves(current, key)
        if not old and new:
            unrecorded.append(key)
            continue
        for name in sorted(set(old) | set(new)):
            before, after = old.get(name, "(none)"), new.get(name, "(none)")
            if before != after:
                lines.append(f"{name}: {_short(before)} -> {_short(after)}")
    if unrecorded:
        lines.append(f"not recorded by the previous launch, not compared: {', '.join(unrecorded)}")
    return lines


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] if len(text) == 40 and all(c in "0123456789abcdef" for c in text) else text   # a commit


def _forge_version() -> str:
    from forge import __version__

    return __version__


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
