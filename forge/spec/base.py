"""The base of every model read from TOML (spec sections, checklist items, monitors, diagnose rules):
strict, closed, immutable, bounded.

strict: TOML is typed, so "512" never silently becomes 512.
extra="forbid": a misspelled key is an error, not an ignored knob.
frozen: validators check, they never rewrite; changes are explicit spec patches.
bounded: no float is inf or nan (allow_inf_nan=False), no integer leaves the signed 64-bit range that TOML
    integers, torch and numpy share (a larger one overflows wherever it is used).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

INT64_MAX = 2**63 - 1


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _within_int64(cls, value: Any) -> Any:
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, int) and not isinstance(item, bool) and not -INT64_MAX - 1 <= item <= INT64_MAX:
                raise ValueError(f"integer out of range: must lie within -2**63 .. 2**63 - 1 (got {item})")
        return value
