"""The metric catalogue (checklists/metrics.toml): every metric forge logs, declared once.

`Catalogue.entry(name)` finds the declaration of a logged name (exact, else the first family pattern
that matches: loss/step_{t} declares loss/step_0, loss/step_1, ...). `check(name, where)` is how rules,
monitors, criteria and plots name metrics: an unknown name is an error naming the file and line, so a
typo never becomes a rule that silently never fires. `design_names()` maps the design's names onto
forge's, for metrics files written by another trainer that follows the design.
"""
from __future__ import annotations

import functools
import re
import tomllib
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, ValidationError, model_validator

from forge.errors import Problem, SpecError
from forge.spec.base import Section

Kind = Literal["gauge", "count", "counter", "maximum", "derived"]


class Metric(Section):
    name: str = Field(pattern=r"^[a-z_]+(/[A-Za-z0-9_{}.-]+)*$")
    meaning: str
    unit: str
    kind: Kind
    source: str
    watches: list[str] = Field(default_factory=list)
    design: Optional[str] = Field(None, description="The design's name where it differs from forge's.")
    rate_of: Optional[str] = Field(None, description="derived: the counter this is the rate of ...")
    per_steps: int = Field(1, ge=1, description="... per this many training steps.")

    @model_validator(mode="after")
    def check_derived(self) -> "Metric":
        if (self.kind == "derived") != (self.rate_of is not None):
            raise ValueError("a derived metric (and only one) names the counter it is the rate_of")
        return self

    @property
    def pattern(self) -> re.Pattern | None:
        if "{" not in self.name:
            return None
        parts = re.split(r"\{[a-z_]+\}", self.name)
        return re.compile("[A-Za-z0-9_.-]+".join(re.escape(p) for p in parts) + "$")


class Catalogue:
    def __init__(self, metrics: list[Metric], path: Path):
        self.metrics, self.path = metrics, path
        self._exact = {m.name: m for m in metrics if "{" not in m.name}
        self._families = [m for m in metrics if "{" in m.name]

    def entry(self, name: str) -> Metric | None:
        if name in self._exact:
            return self._exact[name]
        return next((m for m in self._families if m.pattern.match(name)), None)

    def kind(self, name: str) -> str:
        entry = self.entry(name)
        return entry.kind if entry else "gauge"

    def check(self, name: str, where: str, key: str = "metric") -> None:
        """An error at `where` (file:line) unless `name` is declared. `{last}` (the last outer step) and
        other `{x}` fields in a rule's metric name stand for a family member."""
        probe = re.sub(r"\{[a-z_]+\}", "0", name)
        if self.entry(probe) is None:
            near = [m.name for m in self.metrics if m.name.split("/")[0] == name.split("/")[0]][:6]
            raise SpecError([Problem(where, key, f"unknown metric {name!r}: not in {self.path.name}"
                                     + (f" (known here: {', '.join(near)})" if near else ""), name)],
                            header="unknown metric")

    def design_names(self) -> dict[str, str]:
        """design name -> forge name, for names that differ."""
        return {m.design: m.name for m in self.metrics if m.design and m.design != m.name and "{" not in m.name}

    def from_design(self, record: dict) -> dict:
        """A record of a design-named metrics file with forge's names (family members too:
        train/loss_step_2 -> loss/step_2)."""
        exact = self.design_names()
        families = [(re.compile(re.sub(r"\\\{[a-z_]+\\\}", "(.+)", re.escape(m.design)) + "$"), m.name)
                    for m in self.metrics if m.design and "{" in m.design]
        out = {}
        for key, value in record.items():
            name = exact.get(key, key)
            for pattern, forge_name in families:
                if (match := pattern.match(key)):
                    name = re.sub(r"\{[a-z_]+\}", match.group(1), forge_name, count=1)
            out[name] = value
        return out

    def markdown_table(self) -> str:
        rows = ["| forge name | design name | kind | unit | watches | meaning |", "|---|---|---|---|---|---|"]
        for m in self.metrics:
            meaning = " ".join(m.meaning.split()).replace("|", "\\|")
            rows.append(f"| `{m.name}` | {f'`{m.design}`' if m.design else ''} | {m.kind} | {m.unit} | "
                        f"{', '.join(m.watches)} | {meaning} |")
        return "\n".join(rows)


def catalogue_path() -> Path:
    from forge.checklist.items import checklist_dir

    return checklist_dir() / "metrics.toml"


@functools.lru_cache(maxsize=4)
def _load(path: Path) -> Catalogue:
    from forge.spec.load import key_lines

    text = path.read_text(encoding="utf-8")
    lines = key_lines(text)
    metrics = []
    for n, entry in enumerate(tomllib.loads(text).get("metric", [])):
        try:
            metrics.append(Metric.model_validate(entry))
        except ValidationError as err:
            e = err.errors()[0]
            line = lines.get(("metric", n)) or lines.get(("metric",))
            raise SpecError([Problem(f"{path}:{line}", f"metric.{n}." + ".".join(map(str, e["loc"])), e["msg"])],
                            header="invalid metric catalogue") from None
    names = [m.name for m in metrics]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpecError([Problem(str(path), "metric.name", f"declared twice: {', '.join(dup)}")],
                        header="invalid metric catalogue")
    cat = Catalogue(metrics, path)
    for m in metrics:
        if m.rate_of and cat.kind(m.rate_of) != "counter":
            raise SpecError([Problem(str(path), "metric.rate_of", f"{m.name}: {m.rate_of} is not a counter")],
                            header="invalid metric catalogue")
    return cat


def load_catalogue(path: Path | None = None) -> Catalogue:
    return _load(path or catalogue_path())


README_BEGIN = "<!-- metric catalogue: generated by `python -m forge.metrics.catalogue README.md` -->"
README_END = "<!-- end of metric catalogue -->"


def readme_with_table(text: str, catalogue: Catalogue) -> str:
    """`text` with the block between the README markers replaced by the generated table."""
    head, _, rest = text.partition(README_BEGIN)
    _, _, tail = rest.partition(README_END)
    return f"{head}{README_BEGIN}\n{catalogue.markdown_table()}\n{README_END}{tail}"


if __name__ == "__main__":   # regenerate the README's table: python -m forge.metrics.catalogue README.md
    import sys

    target = Path(sys.argv[1])
    target.write_text(readme_with_table(target.read_text(encoding="utf-8"), load_catalogue()), encoding="utf-8")
