"""Remediations are recorded spec patches, never edits of the original spec.

A patch is a list of JSON-Patch operations over the resolved spec: a `test` of the current value
(so it never applies to a spec that has changed since the run) followed by a `replace`. Applying
it writes `<stem>.r<N>.toml` next to the run's spec file: it `extends` that file, carries the run's
--set overrides and the changed keys only, and opens with a comment naming the run, rule and
evidence. The patch itself is kept in `<spec dir>/patches/<stem>.r<N>.json`, with paths relative to
the spec's directory (a record works from any checkout). N counts the patches of that base spec
family (<stem>.r1, .r2, ...). The chain base -> r1 -> r2 is then the ordinary extends chain (`forge spec
show` prints it). A patch whose changes a recorded patch of the same base already made is refused.
"""
from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge.diagnose.rules import Suggestion, Verdict
from forge.metrics.engine import spec_value
from forge.errors import ForgeError
from forge.spec.load import load_spec

FORMAT = 1


def _pointer(dotted: str) -> str:
    return "/" + dotted.replace(".", "/")


def _dotted(pointer: str) -> str:
    return pointer.strip("/").replace("/", ".")


@dataclass(frozen=True)
class PatchRecord:
    path: Path          # the patch JSON
    spec_path: Path     # the spec file it wrote
    record: dict


def build_patch(finding: Verdict, suggestion: Suggestion, run_id: str, lineage: dict) -> dict:
    ops = []
    for change in suggestion.changes:
        ops.append({"op": "test", "path": _pointer(change.key), "value": change.before})
        ops.append({"op": "replace", "path": _pointer(change.key), "value": change.after})
    return {"format": FORMAT, "run_id": run_id, "rule": finding.rule.id, "title": finding.rule.title,
            "rationale": suggestion.rationale, "confidence": finding.confidence,
            "evidence": [str(e) for e in finding.evidence], "base_spec": str(Path(lineage["spec_file"]).resolve()),
            "base_spec_hash": lineage["spec_hash"], "overrides": lineage.get("overrides", []), "ops": ops,
            "created": dt.datetime.now().isoformat(timespec="seconds")}


def _next_name(base: Path) -> tuple[str, int]:
    stem = re.sub(r"\.r\d+$", "", base.stem)
    taken = [int(m.group(1)) for p in base.parent.glob(f"{stem}.r*.toml")
             if (m := re.fullmatch(rf"{re.escape(stem)}\.r(\d+)", p.stem))]
    n = max(taken, default=0) + 1
    return f"{stem}.r{n}", n


def _check(patch: dict) -> None:
    """The base spec (with the run's overrides) must still resolve to what the run used, and every
    `test` op must hold on it."""
    base = Path(patch["base_spec"])
    if not base.is_file():
        raise ForgeError(f"cannot apply patch: the run's spec {base} no longer exists")
    current = load_spec(base, patch["overrides"])
    data = current.spec.model_dump(mode="json")
    for op in patch["ops"]:
        if op["op"] == "test" and spec_value(data, _dotted(op["path"])) != op["value"]:
            raise ForgeError(f"cannot apply patch: {_dotted(op['path'])} is now "
                             f"{spec_value(data, _dotted(op['path']))!r}, the patch expects {op['value']!r} "
                             f"(the spec changed since run {patch['run_id']})")
    if current.hash != patch["base_spec_hash"]:
        raise ForgeError(f"cannot apply patch: {base} (with the run's overrides) no longer resolves to the spec "
                         f"run {patch['run_id']} used (hash {current.hash[:12]} != {patch['base_spec_hash'][:12]})")


def _nested(assignments: dict[str, Any]) -> dict:
    out: dict = {}
    for dotted, value in assignments.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def write_patched_spec(patch: dict, refuse_duplicate: bool = True) -> PatchRecord:
    """Check the patch against the base spec and write the new spec + the patch record."""
    import tomlkit

    _check(patch)
    base = Path(patch["base_spec"])
    if refuse_duplicate:
        _refuse_duplicate(patch, base)
    name, n = _next_name(base)
    spec_path = base.parent / f"{name}.toml"
    patch_path = base.parent / "patches" / f"{name}.json"
    keys: dict[str, Any] = {}
    overrides = load_spec(base, patch["overrides"]).data  # typed values of the run's --set overrides
    for assignment in patch["overrides"]:
        dotted = assignment.split("=", 1)[0].strip()
        keys[dotted] = spec_value(overrides, dotted)
    for op in patch["ops"]:
        if op["op"] == "replace":
            keys[_dotted(op["path"])] = op["value"]
    doc = tomlkit.document()
    for line in (f"forge diagnose patch r{n} of {base.name}",
                 f"run {patch['run_id']}: rule {patch['rule']} (confidence {patch['confidence']:.2f})",
                 f"{patch['title']}",
                 *[f"evidence: {e}" for e in patch["evidence"]],
                 f"remedy: {patch['rationale']}",
                 *([f"carries the run's overrides: {', '.join(patch['overrides'])}"] if patch["overrides"] else []),
                 f"patch record: patches/{patch_path.name}"):
        doc.add(tomlkit.comment(line))
    doc.add("extends", base.name)
    for key, value in _nested(keys).items():
        doc.add(key, value)
    text = tomlkit.dumps(doc)
    patch_path.parent.mkdir(exist_ok=True)
    spec_path.write_text(text, encoding="utf-8")
    try:
        load_spec(spec_path)  # the written spec must validate; otherwise leave nothing behind
    except ForgeError:
        spec_path.unlink()
        raise
    record = {**patch, "base_spec": base.name, "output": spec_path.name, "number": n}
    patch_path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    return PatchRecord(patch_path, spec_path, record)


def read_patch(path: Path) -> dict:
    """A patch record, its paths resolved against the spec directory it lives in (<spec dir>/patches/)."""
    try:
        patch = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ForgeError(f"{path}: not a readable patch record ({err})") from None
    if not isinstance(patch, dict) or patch.get("format") != FORMAT or not isinstance(patch.get("ops"), list):
        raise ForgeError(f"{path}: not a forge patch record (format {patch.get('format')!r})"
                         if isinstance(patch, dict) else f"{path}: not a forge patch record")
    spec_dir = path.resolve().parent.parent
    return {**patch, "base_spec": str(spec_dir / patch["base_spec"])}


def _changes(patch: dict) -> set[tuple[str, str]]:
    return {(op["path"], json.dumps(op["value"], sort_keys=True)) for op in patch["ops"] if op["op"] == "replace"}


def recorded_patch(patch: dict) -> PatchRecord | None:
    """A recorded patch of the same base spec that already makes (some of) the changes of `patch`."""
    base = Path(patch["base_spec"])
    for path in sorted((base.parent / "patches").glob("*.json")):
        try:
            other = read_patch(path)
        except ForgeError:
            continue
        if Path(other["base_spec"]) == base and _changes(other) and _changes(other) <= _changes(patch):
            return PatchRecord(path, base.parent / str(other.get("output")), other)
    return None


def _refuse_duplicate(patch: dict, base: Path) -> None:
    """The same change on the same base spec twice (diagnosing one run again) would write r2 == r1."""
    found = recorded_patch(patch)
    if found is not None:
        raise ForgeError(f"not applied: {found.path.name} already made this change to {base.name} "
                         f"({found.record.get('output')}); train that spec, or diagnose its run")


def write_or_reuse(patch: dict) -> tuple[PatchRecord, bool]:
    """(record, reused): write_patched_spec, or the recorded patch of the same base, with the same overrides, that
    makes exactly these changes (a heal in a second run of the same spec: the same remedy, one record)."""
    found = recorded_patch(patch)
    same = found is not None and all(found.record.get(k) == patch[k] for k in ("base_spec_hash", "overrides"))
    if same and _changes(found.record) == _changes(patch) and found.spec_path.is_file():
        _check(patch)
        return found, True
    return write_patched_spec(patch, refuse_duplicate=False), False   # another run's overrides: its own record


def apply_finding(result, finding_id: str | None, remedy: int, run_id: str, lineage: dict) -> PatchRecord:
    """--apply: the top finding's remedy, or the chosen finding's; never silently another's."""
    found = result.findings
    if finding_id is None:
        if not found:
            raise ForgeError(f"nothing to apply: no finding (verdict {result.verdict})")
        chosen = found[0]
    else:
        chosen = next((v for v in result.verdicts if v.rule.id == finding_id), None)
        if chosen is None:
            raise ForgeError(f"--finding {finding_id}: no such rule; rules: {', '.join(v.rule.id for v in result.verdicts)}")
        if chosen.state != "fired":
            raise ForgeError(f"--finding {finding_id}: it did not fire on this run ({chosen.state}: {chosen.reason})")
    if not chosen.suggestions:
        if chosen.applied:
            raise ForgeError(f"not applied: the remedy of {chosen.rule.id} is already in the spec chain "
                             f"({'; '.join(chosen.applied)})")
        others = [v.rule.id for v in found if v.suggestions and v is not chosen]
        raise ForgeError(f"{chosen.rule.id} has no remedy as a spec change (see its explanation)"
                         + (f"; apply another finding with --finding ID ({', '.join(others)})" if others else ""))
    if remedy > len(chosen.suggestions):
        raise ForgeError(f"{chosen.rule.id} has {len(chosen.suggestions)} remedies; --remedy {remedy} does not exist")
    return write_patched_spec(build_patch(chosen, chosen.suggestions[remedy - 1], run_id, lineage))
