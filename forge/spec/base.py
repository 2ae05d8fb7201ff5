"""The base of every model read from TOML (spec sections, checklist items, monitors, diagnose rules):
strict, closed, immutable.

strict: TOML is typed, so "512" never silently becomes 512.
extra="forbid": a misspelled key is an error, not an ignored knob.
frozen: validators check, they never rewrite; changes are explicit spec patches.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=True)
