"""The variants of a comparison: every SPEC x the cartesian product of the `--vary key=v1,v2` values x the
seeds, each resolved and validated before anything is written (a bad key or value is a SpecError naming it:
exit 2, nothing on disk).

    plan_variants([specs/tiny.toml], ["optim.grokfast.enabled=true,false"], shared=[], seeds=1)
      -> [Variant("enabled-true", ...), Variant("enabled-false", ...)]   (runs runs/<id>-enabled-true, ...)
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge.errors import ForgeError, Problem, SpecError
from forge.spec.load import ResolvedSpec, load_spec

# what decides a run's held-out batches (forge.data.build.Data.eval_batches): variants that agree on these
# are scored on the same batches
HELD_OUT_KEYS = (("data", "sources"), ("data", "tokenizer"), ("data", "filters"), ("data", "eval"),
                 ("data", "seq_len"), ("data", "batch_size"), ("data", "grad_accum"), ("model", "vocab_size"))


@dataclass(frozen=True)
class Variant:
    name: str                     # short and unique within the comparison: the run id's suffix
    spec_path: Path
    overrides: tuple[str, ...]    # the variant's own assignments (--vary values, the seed)
    resolved: ResolvedSpec        # with the comparison's shared overrides and its budget applied

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "spec": str(self.spec_path), "overrides": list(self.overrides),
                "spec_hash": self.resolved.hash}


def parse_vary(item: str) -> tuple[str, list[str]]:
    """'optim.grokfast.lam=0.1,0.3' -> ('optim.grokfast.lam', ['0.1', '0.3'])."""
    key, sep, values = item.partition("=")
    key = key.strip()
    choices = [v.strip() for v in values.split(",")] if sep else []
    if not key or not choices or any(not v for v in choices):
        raise SpecError([Problem(f"--vary {item}", key, "expected dotted.key=v1,v2 (at least one value), e.g. "
                                 "optim.grokfast.enabled=true,false")])
    if len(set(choices)) != len(choices):
        raise SpecError([Problem(f"--vary {item}", key, "a value is given twice")])
    return key, choices


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "v"


def _name(spec: Path, several_specs: bool, assignments: list[tuple[str, str]], seed: int | None) -> str:
    parts = [spec.stem] if several_specs or not assignments else []
    parts += [f"{key.rsplit('.', 1)[-1]}-{value}" for key, value in assignments]
    parts += [f"seed{seed}"] if seed is not None else []
    return _slug("_".join(parts))


def plan_variants(specs: list, vary: list[str], shared: list[str], seeds: int,
                  budget_overrides=lambda resolved: []) -> list[Variant]:
    """Every spec x every combination of the --vary values x `seeds` seeds (run.seed, run.seed + 1, ...).
    A spec is a path, or (path, its own overrides): a variant the product cannot spell (benchmarks/bench_quality).
    `shared`: --set overrides for every variant; `budget_overrides(resolved)`: the budget's own (train.max_steps
    for a tokens budget), applied last. Raises SpecError (exit 2) naming the key before anything is written."""
    if not specs:
        raise ForgeError("give at least one SPEC to compare")
    specs = [(Path(s), []) if isinstance(s, (str, Path)) else (Path(s[0]), list(s[1])) for s in specs]
    axes = [parse_vary(item) for item in vary]
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise ForgeError(f"--vary names a key twice: {', '.join(k for k in keys if keys.count(k) > 1)}")
    if seeds < 1:
        raise ForgeError(f"--seeds must be at least 1 (got {seeds})")
    variants: list[Variant] = []
    for spec, fixed in specs:
        base = load_spec(spec, [*shared, *fixed])
        for combo in itertools.product(*[values for _, values in axes]):
            assignments = [*(tuple(a.split("=", 1)) for a in fixed), *zip(keys, combo)]
            for i in range(seeds):
                seed = base.spec.run.seed + i if seeds > 1 else None
                own = [f"{k}={v}" for k, v in assignments] + ([f"run.seed={seed}"] if seed is not None else [])
                resolved = _resolve(spec, [*shared, *own], vary)
                resolved = load_spec(spec, [*shared, *own, *budget_overrides(resolved)])
                variants.append(Variant(_name(spec, len(specs) > 1, assignments, seed), spec, tuple(own), resolved))
    if len(variants) < 2:
        raise ForgeError("a comparison needs at least two variants: give several SPECs or --vary key=v1,v2")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):   # e.g. two keys with the same last part: number them instead
        variants = [dataclasses.replace(v, name=f"v{i + 1}") for i, v in enumerate(variants)]
    hashes = [v.resolved.hash for v in variants]
    if len(set(hashes)) != len(hashes):
        same = [v.name for v in variants if hashes.count(v.resolved.hash) > 1]
        raise ForgeError(f"variants {', '.join(same)} resolve to the same spec: a --vary value that equals "
                         "another changes nothing")
    return variants


def _resolve(spec: Path, overrides: list[str], vary: list[str]) -> ResolvedSpec:
    """load_spec, with a --vary value's problem located at its --vary argument (not at --set)."""
    try:
        return load_spec(spec, overrides)
    except SpecError as err:
        def located(p: Problem) -> Problem:
            if not p.where.startswith("--set "):
                return p
            key = p.where.removeprefix("--set ").split("=", 1)[0].strip()
            item = next((v for v in vary if v.partition("=")[0].strip() == key), None)
            return dataclasses.replace(p, where=f"--vary {item}") if item else p
        raise SpecError([located(p) for p in err.problems]) from None


def held_out_key(resolved: ResolvedSpec) -> str:
    """A fingerprint of what decides the held-out batches (HELD_OUT_KEYS)."""
    import hashlib
    import json

    data = resolved.spec.model_dump(mode="json")
    picked = [data[a][b] for a, b in HELD_OUT_KEYS]
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:12]


def spec_diff(base: dict[str, Any], other: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: base -> other' for every leaf that differs (validated spec dumps)."""
    out = []
    for key in sorted(set(base) | set(other)):
        a, b = base.get(key), other.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += spec_diff(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: {_short(a)} -> {_short(b)}")
    return out


def _short(value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."
