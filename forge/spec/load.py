"""Load a spec: read TOML, follow `extends`, apply `--set` overrides, validate, hash.

Merge rule: tables merge key by key; any other value (scalars, arrays, arrays of tables) in the
extending file replaces the base value whole. Every key remembers the file and line that set it, so
every validation error points at a line a user can open.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

from pydantic import BaseModel, ValidationError

from forge.errors import Problem, SpecError
from forge.spec.schema import Spec

KeyPath = tuple[Union[str, int], ...]


@dataclass(frozen=True)
class Origin:
    file: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


@dataclass(frozen=True)
class ResolvedSpec:
    """A validated spec plus where it came from (its lineage) and its content hash."""

    spec: Spec
    data: dict[str, Any]                    # the merged, overridden dict that was validated
    chain: tuple[Path, ...]                 # base first, the file named by the user last
    overrides: tuple[str, ...]              # the --set arguments, in order
    origins: dict[KeyPath, Origin] = field(repr=False, compare=False)

    @property
    def path(self) -> Path:
        return self.chain[-1]

    @property
    def hash(self) -> str:
        return spec_hash(self.spec)


def spec_hash(spec: Spec) -> str:
    """sha256 of the canonical JSON of the validated spec: equal specs hash equal, however composed."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
              migrate: Callable[[dict], None] | None = None) -> ResolvedSpec:
    """`migrate` brings the data of an older run's spec.toml up to date before validation
    (forge.train.run_dir.SPEC_MIGRATIONS)."""
    path = Path(path)
    data, origins, chain = _read_chain(path, ())
    if migrate is not None:
        migrate(data)
    for assignment in overrides:
        _apply_override(data, origins, assignment)
    try:
        spec = Spec.model_validate(data)
    except ValidationError as err:
        raise SpecError([_problem(e, data, origins, path) for e in err.errors()]) from None
    return ResolvedSpec(spec, data, tuple(chain), tuple(overrides), origins)


# ---------------------------------------------------------------------------------------------- files

def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _read_chain(path: Path, seen: tuple[Path, ...], named_at: Origin | None = None):
    shown = _display(path)
    real = path.resolve()
    if real in seen:
        cycle = " -> ".join(_display(p) for p in (*seen, real))
        raise SpecError([Problem(str(named_at), "extends", f"cyclic extends: {cycle}", str(path))])
    where = str(named_at) if named_at else shown
    if not path.is_file():
        raise SpecError([Problem(where, "extends" if named_at else "",
                                 f"spec file not found: {shown}")])
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise SpecError([Problem(str(Origin(shown, line)), "", f"not UTF-8 text (byte {err.start}: "
                                 f"{err.object[err.start:err.start + 1]!r}); a spec is a UTF-8 TOML file")]) from None
    except OSError as err:
        raise SpecError([Problem(where, "extends" if named_at else "",
                                 f"cannot read {shown}: {err.strerror or err}")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        line = getattr(err, "lineno", None) or _line_from_message(str(err))
        raise SpecError([Problem(str(Origin(shown, line)), "", f"malformed TOML: {err}")]) from None
    lines = key_lines(text)
    own = {k: Origin(shown, n) for k, n in lines.items()}
    base_name = data.pop("extends", None)
    if base_name is None:
        return data, own, [real]
    at = own.get(("extends",), Origin(shown))
    if not isinstance(base_name, str):
        raise SpecError([Problem(str(at), "extends", "must be a string: a path relative to this file",
                                 base_name)])
    base, origins, chain = _read_chain(path.parent / base_name, (*seen, real), at)
    own.pop(("extends",), None)
    _merge(base, data, origins, own, ())
    return base, origins, [*chain, real]


def _line_from_message(message: str) -> int | None:
    match = re.search(r"line (\d+)", message)
    return int(match.group(1)) if match else None


def _merge(base: dict, child: dict, origins: dict, child_origins: dict, prefix: KeyPath) -> None:
    for key, value in child.items():
        here = (*prefix, key)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, origins, child_origins, here)
        else:
            base[key] = value
            _drop_under(origins, here)
        for k, o in child_origins.items():
            if k[: len(here)] == here:
                origins[k] = o


def _drop_under(origins: dict, prefix: KeyPath) -> None:
    for k in [k for k in origins if k[: len(prefix)] == prefix]:
        del origins[k]


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_ASSIGN = re.compile(r"^\s*([A-Za-z0-9_\-\"'. ]+?)\s*=")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'')


def key_lines(text: str) -> dict[KeyPath, int]:
    """Line number (1-based) of every table header and key assignment in a TOML text.

    Inline tables and multi-line values are attributed to the line of their key; lookups fall
    back to the nearest enclosing key (see _locate).
    """
    lines: dict[KeyPath, int] = {}
    table: KeyPath = ()
    aot_count: dict[KeyPath, int] = {}
    depth = 0  # open brackets of a multi-line value: lines inside it are not assignments
    for n, raw in enumerate(_mask_strings(text), start=1):
        line = _strip_comment(raw)
        if depth == 0:
            header = _HEADER.match(line)
            if header:
                name = tuple(_split_key(header.group(2)))
                if header.group(1) == "[[":
                    index = aot_count.get(name, 0)
                    aot_count[name] = index + 1
                    table = (*name, index)
                    lines.setdefault(name, n)
                else:
                    table = name
                lines[table] = n
                continue
            assign = _ASSIGN.match(line)
            if assign:
                lines[(*table, *_split_key(assign.group(1)))] = n
        bare = _STRING.sub("", line)
        depth = max(0, depth + bare.count("[") + bare.count("{") - bare.count("]") - bare.count("}"))
    return lines


def _mask_strings(text: str) -> list[str]:
    """The lines of `text` with every character inside a string that could look like TOML structure
    (brackets, braces, `=`, `#`, quotes of the other kind) blanked, multi-line strings included: a
    `[` or `key = ` inside a triple-quoted string opens no value and assigns no key. Line numbers are kept."""
    out, quote = [], None                # quote: the delimiter of the string open at this point
    for raw in text.splitlines():
        chars, i = [], 0
        while i < len(raw):
            ch = raw[i]
            if quote is None:
                if ch == "#":
                    chars.append(raw[i:])
                    break
                quote = raw[i:i + 3] if raw[i:i + 3] in ('"""', "'''") else ch if ch in "\"'" else None
                chars.append(quote or ch)
                i += len(quote or ch)
            elif raw.startswith(quote, i):
                chars.append(quote)
                i += len(quote)
                quote = None
            else:
                escaped = quote[0] == '"' and ch == "\\"
                chars.append(" " * len(raw[i:i + 2]) if escaped else ch if ch.isalnum() or ch in "_-. " else " ")
                i += 2 if escaped else 1
        if quote is not None and len(quote) == 1:   # a one-line string cannot go on (malformed: tomllib said so)
            quote = None
        out.append("".join(chars))
    return out


def _strip_comment(line: str) -> str:
    out, quote = [], None
    for ch in line:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            break
        out.append(ch)
    return "".join(out)


def _split_key(key: str) -> list[str]:
    return [part.strip().strip("\"'") for part in key.split(".")]


def _locate(path: KeyPath, origins: dict[KeyPath, Origin], fallback: str) -> str:
    for end in range(len(path), 0, -1):
        if path[:end] in origins:
            return str(origins[path[:end]])
    return fallback


# ------------------------------------------------------------------------------------------ overrides

def _apply_override(data: dict, origins: dict, assignment: str) -> None:
    where = f"--set {assignment}"
    if "=" not in assignment:
        raise SpecError([Problem(where, "", "expected dotted.key=value, e.g. optim.grokfast.lam=0.1")])
    dotted, raw = (part.strip() for part in assignment.split("=", 1))
    path = _parse_path(dotted, data, where)
    annotation = _annotation_at(path, data, where)
    value = _typed_value(raw, annotation)
    target = data
    for part in path[:-1]:   # a section the files leave to its defaults ([train.heal]) starts empty
        target = target.setdefault(part, {}) if isinstance(part, str) else target[part]
    target[path[-1]] = value
    _drop_under(origins, path)
    origins[path] = Origin(where)


def _parse_path(dotted: str, data: dict, where: str) -> KeyPath:
    parts: list[str | int] = []
    node: Any = data
    for token in dotted.split("."):
        if isinstance(node, list):
            if not token.isdigit() or int(token) >= len(node):
                raise SpecError([Problem(where, ".".join(map(str, parts)),
                                         f"index {token!r} out of range (the list has {len(node)} entries)")])
            parts.append(int(token))
            node = node[int(token)]
        else:
            parts.append(token)
            node = node.get(token) if isinstance(node, dict) else None
    if not parts or any(p == "" for p in parts):
        raise SpecError([Problem(where, dotted, "empty key path")])
    return tuple(parts)


def _annotation_at(path: KeyPath, data: dict, where: str) -> Any:
    """The schema type of the field at `path`; unknown keys get a 'did you mean'."""
    model: Any = Spec
    node: Any = data
    annotation: Any = Spec
    for i, part in enumerate(path):
        annotation = _unwrap(annotation)
        if isinstance(part, int):
            annotation = typing.get_args(annotation)[0] if typing.get_args(annotation) else Any
            node = node[part]
            continue
        model = _model_of(annotation, node)
        if model is None or part not in model.model_fields:
            known = list(model.model_fields) if model else []
            raise SpecError([Problem(where, ".".join(map(str, path[: i + 1])),
                                     "unknown key" + _did_you_mean(str(part), known))])
        annotation = model.model_fields[part].annotation
        node = node.get(part) if isinstance(node, dict) else None
    return annotation


def _unwrap(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _model_of(annotation: Any, node: Any) -> type[BaseModel] | None:
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    members = [_unwrap(a) for a in typing.get_args(annotation)]
    models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
    if len(models) > 1 and isinstance(node, dict):  # discriminated union: pick by the `type` value
        for m in models:
            if typing.get_args(m.model_fields["type"].annotation) == (node.get("type"),):
                return m
    return models[0] if models else None


def _typed_value(raw: str, annotation: Any) -> Any:
    """Parse `raw` as a TOML value, except where the schema wants a string (then quotes are optional)."""
    if _wants_string(annotation) and not (raw[:1] in "\"'" and raw[-1:] == raw[:1] and len(raw) > 1):
        return raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # let validation report the type mismatch with the raw text as the value given


def _wants_string(annotation: Any) -> bool:
    annotation = _unwrap(annotation)
    if annotation is str:
        return True
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return all(isinstance(a, str) for a in args)
    if typing.get_origin(annotation) in (Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return len(non_none) == 1 and _wants_string(non_none[0])
    return False


def _did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f"; expected one of: {', '.join(candidates)}" if candidates else ""


# --------------------------------------------------------------------------------- validation errors

_DOTTED = re.compile(r"\b[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*\b")


def _problem(error: dict, data: dict, origins: dict, path: Path) -> Problem:
    loc = _without_union_tags(error["loc"])
    kind, message = error["type"], error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
        loc = _key_named_in(message, loc, origins) or loc
    if kind == "extra_forbidden":
        siblings = _schema_fields(loc[:-1], data)
        message = "unknown key" + _did_you_mean(str(loc[-1]), siblings)
    elif kind == "missing":
        message = "required key is missing"
    key = ".".join(map(str, loc))
    where = _locate(loc, origins, _display(path))
    if kind == "missing" or "input" not in error or isinstance(error["input"], dict):
        return Problem(where, key, message)
    return Problem(where, key, message, error["input"])


def _without_union_tags(loc: tuple) -> KeyPath:
    """pydantic puts the discriminator value after a list index (sources.1.hub.weight): drop it."""
    out: list = []
    for i, part in enumerate(loc):
        if i and isinstance(loc[i - 1], int) and isinstance(part, str) and part in ("hub", "local", "builtin"):
            continue
        out.append(part)
    return tuple(out)


def _key_named_in(message: str, loc: KeyPath, origins: dict) -> KeyPath | None:
    """Cross-field validators name the keys they check; point at the first one that has a line."""
    for word in _DOTTED.findall(message):
        rel = tuple(word.split("."))
        for candidate in (rel, (*loc, *rel)):
            if candidate in origins:
                return candidate
    return None


def _schema_fields(loc: KeyPath, data: dict) -> list[str]:
    try:
        annotation = _annotation_at(loc, data, "") if loc else Spec
    except (SpecError, KeyError, IndexError, TypeError):
        return []
    node: Any = data
    for part in loc:
        node = node[part] if isinstance(node, (dict, list)) else None
    model = _model_of(annotation, node)
    return list(model.model_fields) if model else []
