"""[run]: identity of an experiment and where its artefacts go."""
from __future__ import annotations

from pydantic import Field

from forge.spec.base import Section


class RunSpec(Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="Experiment name; prefix of every run id (letters, digits, _ . -).")
    seed: int = Field(ge=0, le=2**63 - 1, description="The one seed of the run: model init, data order, sampling "
                                                      "(0 .. 2**63 - 1: what torch.manual_seed accepts).")
    output_dir: str = Field("runs", min_length=1,
                            description="Directory (relative to the working directory) that holds runs/<run-id>/.")
    checklist: str = Field(pattern=r"^[A-Za-z0-9_.-]+$",
                           description="Name of the before-first-run checklist that gates this spec: "
                                       "checklists/<name>.toml in the forge project (or $FORGE_CHECKLIST_DIR).")
