"""Checklists are data: TOML files in checklists/, each a list of items that call registered checks.

A checklist may `extends = "other.toml"`: items with the same id override the base item field by
field (params merge key by key), new ids are appended, and `drop = [ids]` removes base items.
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from forge.errors import Problem, SpecError
from forge.spec.base import Section
from forge.spec.load import Origin, key_lines

Severity = Literal["critical", "monitor"]


class Item(Section):
    id: str = Field(pattern=r"^([A-G][1-3]|CFG|OBS)-[a-z0-9-]+$",
                    description="Stable id; starts with the premortem failure mode it guards (A1..G2).")
    title: str = Field(min_length=1)
    severity: Severity
    check: str = Field(min_length=1, description="Name of a registered check (forge/checklist/checks).")
    params: dict[str, Any] = Field(default_factory=dict)


class Checklist(Section):
    name: str
    description: str = ""
    items: list[Item]
    source: str = ""  # the file (and chain) it was read from


def checklist_dir() -> Path:
    """$FORGE_CHECKLIST_DIR, else the checklists/ folder of the forge project."""
    return Path(os.environ.get("FORGE_CHECKLIST_DIR", Path(__file__).resolve().parents[2] / "checklists"))


def load_checklist(name: str) -> Checklist:
    path = checklist_dir() / f"{name}.toml"
    if not path.is_file():
        available = sorted(p.stem for p in checklist_dir().glob("*.toml"))
        raise _invalid("run.checklist", "run.checklist",
                       f"no checklist {name!r} in {checklist_dir()} (available: {', '.join(available)})", name)
    return _load(path, ())


def _invalid(where: str, key: str, message: str, *value: Any) -> SpecError:
    return SpecError([Problem(where, key, message, *value)], header="invalid checklist")


def _load(path: Path, seen: tuple[Path, ...]) -> Checklist:
    from forge.checklist.registry import known_checks

    shown = str(path)
    if path.resolve() in seen:
        raise _invalid(shown, "extends", "cyclic checklist extends")
    text = path.read_text(encoding="utf-8")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise _invalid(shown, "", f"malformed TOML: {err}") from None
    lines = key_lines(text)

    def where(*key) -> str:
        return str(Origin(shown, lines.get(tuple(key))))

    items: dict[str, dict] = {}
    if "extends" in raw:
        base = _load(path.parent / raw.pop("extends"), (*seen, path.resolve()))
        items = {i.id: i.model_dump() for i in base.items}
    raw.pop("monitor", None)  # during-training monitors: read by forge.train.monitors
    raw.pop("criterion", None)  # success criteria: read by forge.report.criteria
    for dropped in raw.pop("drop", []):
        if items.pop(dropped, None) is None:
            raise _invalid(where("drop"), "drop", "no such item in the base checklist", dropped)
    for n, item in enumerate(raw.pop("item", [])):
        merged = dict(items.get(item.get("id"), {}))
        params = {**merged.get("params", {}), **item.get("params", {})}
        merged.update(item)
        merged["params"] = params
        try:
            checked = Item.model_validate(merged)
        except ValidationError as err:
            e = err.errors()[0]
            raise _invalid(where("item", n, *e["loc"][:1]), f"item.{n}." + ".".join(map(str, e["loc"])),
                           e["msg"]) from None
        if checked.check not in known_checks():
            raise _invalid(where("item", n, "check"), f"item.{n}.check",
                           f"unknown check; known: {', '.join(sorted(known_checks()))}", checked.check)
        items[checked.id] = checked.model_dump()  # an overridden id keeps its place
    try:
        return Checklist.model_validate({**raw, "items": list(items.values()), "source": shown})
    except ValidationError as err:
        e = err.errors()[0]
        raise _invalid(shown, ".".join(map(str, e["loc"])), e["msg"]) from None
