"""What a check can see: the resolved spec and the runtime settings of this invocation."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from forge.spec.load import ResolvedSpec


def default_data_dir() -> Path:
    """The data root of local sources: $FORGE_DATA_DIR, else ./data."""
    return Path(os.environ.get("FORGE_DATA_DIR", "data"))


@dataclass
class CheckContext:
    resolved: ResolvedSpec
    data_dir: Path = field(default_factory=default_data_dir)
    device: str | None = None        # forge check --device: the device to judge for (default: the spec's)
    memory_gb: float | None = None   # forge check --memory-gb: its memory budget (default: the device's memory)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def spec(self):
        return self.resolved.spec

    def cached(self, key: str, build: Callable[[], Any]) -> Any:
        """Build an expensive object (a meta-device model, a tokenizer) once per checklist run."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]
