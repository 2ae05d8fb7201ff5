"""The whole experiment spec: one pydantic tree, one section per component.

A spec file may start with `extends = "other.toml"` (resolved by forge.spec.load before validation);
the resolved spec has no `extends`.
"""
from __future__ import annotations

from pydantic import model_validator

from forge.spec.base import Section
from forge.spec.data import DataSpec
from forge.spec.model import ModelSpec
from forge.spec.objective import ObjectiveSpec
from forge.spec.optim import OptimSpec
from forge.spec.probes import ProbesSpec
from forge.spec.run import RunSpec
from forge.spec.training import CheckpointSpec, LoggingSpec, MergePreviewSpec, TrainSpec


class Spec(Section):
    """A forge experiment. Files may compose with `extends = "base.toml"` (relative to the file)."""

    run: RunSpec
    model: ModelSpec
    objective: ObjectiveSpec
    optim: OptimSpec
    data: DataSpec
    train: TrainSpec
    checkpoint: CheckpointSpec
    logging: LoggingSpec
    merge_preview: MergePreviewSpec
    probes: ProbesSpec

    @model_validator(mode="after")
    def check_cross_section(self) -> "Spec":
        att, data = self.model.attention, self.data
        if att.sw_window > data.filters.max_length:
            raise ValueError(f"model.attention.sw_window ({att.sw_window}) must be <= data.filters.max_length "
                             f"({data.filters.max_length})")
        lengths = [data.seq_len] + [c.seq_len for c in data.curriculum]
        if max(lengths) > data.filters.max_length:
            raise ValueError(f"sequence length {max(lengths)} (data.seq_len / curriculum) exceeds "
                             f"data.filters.max_length ({data.filters.max_length})")
        if self.model.memory.enabled and any(n % self.model.memory.chunk_size for n in lengths):
            raise ValueError(f"every sequence length ({lengths}) must be a multiple of "
                             f"model.memory.chunk_size ({self.model.memory.chunk_size})")
        probes, names = self.probes, [s.name for s in data.sources]
        unknown = [n for n in probes.reasoning_sources if n not in names]
        if unknown:
            raise ValueError(f"probes.reasoning_sources names unknown sources {unknown} (sources: {', '.join(names)})")
        if probes.long_range_seq_len <= att.sw_window:
            raise ValueError(f"probes.long_range_seq_len ({probes.long_range_seq_len}) must exceed "
                             f"model.attention.sw_window ({att.sw_window}): long range means beyond the window")
        return self

