"""Atomic, verifiable checkpoints that load without executing code.

    checkpoints/step-0000100/
        model.safetensors   weights (tied embedding/LM head stored once, restored as one Parameter)
        state.pt            optimizer, schedule, Grokfast, data-loader, RNG, counters: tensors and plain
                            Python types only, read back with torch.load(weights_only=True)
        meta.json           step, run id, spec hash, time
        manifest.json       sha256 and size of every file above; written last

A checkpoint is written into a hidden temporary directory, every file fsynced, then renamed into
place; so a kill at any moment leaves the previous checkpoint loadable (F2). A write that fails (a full or
read-only disk) removes its temporary directory and raises CheckpointError. No checkpoint holds a
non-finite tensor: save_checkpoint refuses them, and verify() checks content as well as checksums (the
manifest lists every file, meta.json is valid, the weights and the state load and are finite), so a resume
walks back over any checkpoint that would not load. Directories under checkpoints/ that are not named
step-NNNNNNN are not checkpoints: ignored with a warning. With checkpoint.async_save the same write runs in
a background thread (BackgroundWriter) on a CPU snapshot taken before training goes on.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

from forge.errors import ForgeError

MANIFEST = "manifest.json"
PREFIX = "step-"
FILES = ("model.safetensors", "state.pt", "meta.json")
_NAME = re.compile(rf"^{PREFIX}(\d{{7,}})$")


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
    """Write checkpoint `step` atomically. `model` is the module, or its weights as snapshot() returns them.
    Refuses non-finite tensors; a failed write leaves no temporary directory behind (CheckpointError)."""
    bad = nonfinite_tensors(model if isinstance(model, dict) else model.state_dict(), "model.") + \
        nonfinite_tensors(state, "state.")
    if bad:
        raise CheckpointError(f"refusing to write checkpoint {step}: non-finite values in {listed(bad)}")
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_files(tmp, step, model, state, meta)
        if final.exists():  # re-saving a step (e.g. the final step after a resume): swap, don't merge
            trash = root / f".old-{final.name}-{os.getpid()}"
            final.rename(trash)
            tmp.rename(final)
            shutil.rmtree(trash)
        else:
            tmp.rename(final)
        _fsync_dir(root)
    except Exception as err:   # OSError, or torch.save's RuntimeError on a full disk ("unexpected pos")
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {type(err).__name__}: {err} "
                              f"({_free_space(root)}; the previous checkpoints are intact: free space or make "
                              f"{root} writable, then resume)") from None
    return final


def _write_files(tmp: Path, step: int, model, state: dict[str, Any], meta: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import save_file, save_model

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
    for name in FILES:
        _fsync(tmp / name)
        files[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2))
    _fsync(tmp / MANIFEST)
    _fsync_dir(tmp)


def _free_space(root: Path) -> str:
    for path in (root, *root.parents):
        if path.exists():
            try:
                return f"{shutil.disk_usage(path).free / 1e6:,.0f} MB free on {path}"
            except OSError:
                break
    return "free space unknown"


def listed(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def nonfinite_tensors(obj, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (nested) dict/list that hold NaN or inf."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [prefix.rstrip(".")] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    if isinstance(obj, dict):
        return [n for k, v in obj.items() for n in nonfinite_tensors(v, f"{prefix}{k}.")]
    if isinstance(obj, (list, tuple)):
        return [n for i, v in enumerate(obj) for n in nonfinite_tensors(v, f"{prefix}{i}.")]
    return []


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
    """None when the checkpoint at `path` is complete, intact and loadable with finite values, else what is
    wrong with it: the manifest lists every file with its checksum, meta.json is a JSON object naming this
    step, the weights parse as safetensors and the state loads with weights_only=True, every float finite."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (an interrupted write)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        missing = [name for name in FILES if name not in files]
        if missing:
            return f"the manifest does not list {', '.join(missing)}"
        for name in FILES:
            file, info = path / name, files[name]
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != info["bytes"] or _sha256(file) != info["sha256"]:
                return f"{name} does not match its checksum"
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeError) as err:
        return f"unreadable manifest ({type(err).__name__}: {err})"
    except OSError as err:
        return f"unreadable ({err})"
    return _content_problem(path)


def _content_problem(path: Path) -> str | None:
    import torch
    from safetensors import safe_open

    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeError, OSError) as err:
        return f"meta.json is not valid JSON ({err})"
    if not isinstance(meta, dict) or meta.get("step") != step_of(path):
        return f"meta.json does not name step {step_of(path)}"
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            weights = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:   # safetensors raises its own error types for a bad header or short data
        return f"model.safetensors does not load ({type(err).__name__}: {err})"
    if not weights:
        return "model.safetensors holds no tensors"
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:   # a weights_only refusal or a corrupt pickle
        return f"state.pt cannot be loaded safely ({type(err).__name__}: {err})"
    bad = nonfinite_tensors(weights, "model.") + nonfinite_tensors(state, "state.")
    return f"non-finite values in {listed(bad)}" if bad else None


def step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def is_checkpoint_name(name: str) -> bool:
    return _NAME.match(name) is not None


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def list_checkpoints(root: Path, report: Callable[[str], None] | None = None) -> list[Path]:
    """Checkpoint directories by step, oldest first (not verified). Other entries under `root` that are not
    checkpoints (step-0000004.bak, notes/) are left alone, each named to `report` (default: a warning);
    the hidden directories of writes in progress are not reported."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if is_checkpoint_name(p.name) and p.is_dir():
            found.append(p)
        elif not p.name.startswith("."):
            (report or _warn)(f"ignoring {p}: not a checkpoint (checkpoints are directories named "
                              f"{PREFIX}NNNNNNN)")
    return sorted(found, key=step_of)


def latest_valid(root: Path, report: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint that verifies (content included); each newer one that does not is skipped with
    one line to `report` (default: a warning)."""
    for path in reversed(list_checkpoints(root, report)):
        problem = verify(path)
        if problem is None:
            return path
        (report or _warn)(f"skipping checkpoint {path.name}: {problem}")
    return None


def load_checkpoint(path: Path, model) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into `model` (strict) and return (state, meta). Never unpickles arbitrary objects."""
    import torch
    from safetensors.torch import load_model

    problem = verify(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is not loadable: {problem}")
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except RuntimeError as err:   # a shape that differs from the model's
        raise CheckpointError(f"checkpoint {path} does not fit the model built from the spec: "
                              f"{str(err).splitlines()[0]}") from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit the model built from the spec: "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # a weights_only refusal or a corrupt pickle: say which file
        raise CheckpointError(f"{path / 'state.pt'} cannot be loaded safely: {err}") from None
    return state, read_meta(path)


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / "meta.json").read_text(encoding="utf-8"))


def prune(root: Path, keep_last_n: int) -> list[Path]:
    """Keep the newest keep_last_n checkpoints that verify, and any newer ones that do not (evidence; a resume
    walks back over them); delete the older ones and the debris of interrupted writes. So the newest healthy
    checkpoint is never deleted, whatever is wrong with the newer ones. Non-checkpoint entries stay, unreported
    (the resume that started this process named them)."""
    removed = []
    for debris in [*root.glob(".tmp-*"), *root.glob(".old-*")] if root.is_dir() else []:
        shutil.rmtree(debris, ignore_errors=True)
        removed.append(debris)
    healthy = 0
    for path in reversed(list_checkpoints(root, report=lambda _: None)):
        if healthy >= keep_last_n:
            shutil.rmtree(path)
            removed.append(path)
        elif verify(path) is None:
            healthy += 1
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
