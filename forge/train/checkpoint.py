"""Atomic, verifiable checkpoints that load without executing code.

    checkpoints/step-0000100/
        model.safetensors   weights (tied embedding/LM head stored once, restored as one Parameter)
        state.pt            optimizer, schedule, Grokfast, data-loader, RNG, counters: tensors and plain
                            Python types only, read back with torch.load(weights_only=True)
        meta.json           step, run id, spec hash, time
        manifest.json       sha256 and size of every file above; written last

A checkpoint is written into a hidden temporary directory, every file fsynced, then renamed into
place; a directory without a manifest, or whose checksums do not match, is ignored with a warning.
So a kill at any moment leaves the previous checkpoint loadable (F2). With checkpoint.async_save the same
write runs in a background thread (BackgroundWriter) on a CPU snapshot taken before training goes on.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

from forge.errors import ForgeError

MANIFEST = "manifest.json"
PREFIX = "step-"


class CheckpointError(ForgeError):
    pass


def chmod_like_open(path: Path) -> None:
    """safetensors creates its file 0600; give it the mode open() gives every other file of the run (0666 less
    the umask), so a run directory shared with a group or copied elsewhere is readable throughout."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def save_checkpoint(root: Path, step: int, model, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write checkpoint `step` atomically. `model` is the module, or its weights as snapshot() returns them."""
    import torch
    from safetensors.torch import save_file, save_model

    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if isinstance(model, dict):
        save_file(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        save_model(model, str(tmp / "model.safetensors"))
    chmod_like_open(tmp / "model.safetensors")
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step,
                                               "saved": dt.datetime.now().isoformat(timespec="seconds")},
                                              indent=2, default=str))
    files = {}
    for name in ("model.safetensors", "state.pt", "meta.json"):
        _fsync(tmp / name)
        files[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2))
    _fsync(tmp / MANIFEST)
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. the final step after a resume): swap, don't merge
        trash = root / f".old-{final.name}-{os.getpid()}"
        final.rename(trash)
        tmp.rename(final)
        shutil.rmtree(trash)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    return final


def snapshot(model, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """CPU copies of the weights (a tensor shared by several names, like the tied embedding, stored once) and
    of every tensor in `state`, so that training may go on while they are written."""
    weights, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            weights[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return weights, _cpu_copy(state)


def _cpu_copy(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


class BackgroundWriter:
    """Runs checkpoint writes in a background thread, one at a time: submit() first waits for the previous
    write. An error in the thread is raised by the next submit() or wait()."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write, *args) -> None:
        self.wait()

        def run():
            try:
                write(*args)
            except BaseException as err:   # handed to the training thread at the next wait()
                self._error = err

        self._thread = threading.Thread(target=run, name="forge-checkpoint", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


def verify(path: Path) -> str | None:
    """None when the checkpoint at `path` is complete and intact, else what is wrong with it."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (an interrupted write)"
    try:
        manifest = json.loads(manifest_path.read_text())
        for name, info in manifest["files"].items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != info["bytes"] or _sha256(file) != info["sha256"]:
                return f"{name} does not match its checksum"
    except (ValueError, KeyError, TypeError) as err:
        return f"unreadable manifest ({err})"
    return None


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories by step, oldest first (not verified)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)),
                  key=step_of)


def latest_valid(root: Path) -> Path | None:
    """The newest checkpoint that verifies; broken ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        problem = verify(path)
        if problem is None:
            return path
        warnings.warn(f"ignoring checkpoint {path}: {problem}", stacklevel=2)
    return None


def load_checkpoint(path: Path, model) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into `model` (strict) and return (state, meta). Never unpickles arbitrary objects."""
    import torch
    from safetensors.torch import load_model

    problem = verify(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is not loadable: {problem}")
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit the model built from the spec: "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # a weights_only refusal or a corrupt pickle: say which file
        raise CheckpointError(f"{path / 'state.pt'} cannot be loaded safely: {err}") from None
    return state, read_meta(path)


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / "meta.json").read_text())


def prune(root: Path, keep_last_n: int) -> list[Path]:
    """Delete all but the newest keep_last_n checkpoints, and debris of interrupted writes."""
    removed = []
    for debris in root.glob(".tmp-*") if root.is_dir() else []:
        shutil.rmtree(debris, ignore_errors=True)
        removed.append(debris)
    for path in list_checkpoints(root)[:-keep_last_n]:
        shutil.rmtree(path)
        removed.append(path)
    return removed


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
