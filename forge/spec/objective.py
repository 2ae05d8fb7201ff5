"""[objective]: the composite training loss of the design."""
from __future__ import annotations

from pydantic import Field, PositiveFloat, model_validator

from forge.spec.base import Section


class ObjectiveSpec(Section):
    next_token: float = Field(ge=0, description="Weight of the (deep-supervised) next-token cross-entropy.")
    sequence_coherence: float = Field(ge=0, description="Weight of the coherence term: in-batch InfoNCE that the "
                                                        "pooled first half of a sequence identifies its own second half.")
    diversity: float = Field(ge=0, description="Weight of the diversity penalty: mean pairwise cosine similarity of "
                                               "pooled sequence representations in the batch.")
    coherence_temperature: PositiveFloat = Field(0.1, description="Temperature of the coherence InfoNCE.")
    attention_entropy: float = Field(0.0, ge=0, description="Weight of the attention-entropy regulariser (E2, "
                                                            "attention sinks); 0 disables it.")

    @model_validator(mode="after")
    def check_some_weight(self) -> "ObjectiveSpec":
        if self.next_token <= 0:
            raise ValueError("next_token must be > 0: a language model needs its next-token loss")
        return self
