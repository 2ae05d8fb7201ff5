"""[probes]: what a perplexity number alone cannot show, measured at every evaluation (train.eval_every).

Samples from fixed prompts (A2), reasoning exact match (A1), long-range accuracy beyond the attention window
(B2), position recall at fixed distances (E1), attention heatmaps at chosen steps (B2, E2) and the ACT
halting histogram (C1). Every set is fixed (drawn once from the held-out split with a generator seeded by
run.seed), so the numbers of two evaluations compare.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import Field, PositiveInt, model_validator

from forge.spec.base import Section

SourceName = Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$")]


class ProbesSpec(Section):
    enabled: bool = Field(True, description="Run the probes at every evaluation (and write samples/heatmaps into "
                                            "the run directory).")
    sample_prompt_tokens: PositiveInt = Field(description="Samples (A2): the prompt of each source is the first "
                                                          "this many tokens of its first held-out document.")
    sample_new_tokens: PositiveInt = Field(description="Samples: tokens generated per prompt (fewer if eos comes).")
    sample_temperature: float = Field(ge=0, description="Samples: softmax temperature; 0 = greedy.")
    sample_top_k: int = Field(ge=0, description="Samples: keep the k most likely tokens before sampling; 0 = all.")
    reasoning_sources: list[SourceName] = Field(
        description="Reasoning probe (A1): sources whose held-out documents are GSM8K solutions ending in "
                    "'#### N'; each item is the problem and its worked solution up to '####', scored by exact "
                    "match of the final number (greedy, full depth). Empty = arithmetic items only.")
    reasoning_items: int = Field(ge=0, description="GSM8K items (the first usable held-out documents).")
    arithmetic_items: int = Field(ge=0, description="Arithmetic items 'a + b = ' -> 'c' followed by a newline "
                                                    "(operands drawn with the probe generator).")
    long_range_seq_len: PositiveInt = Field(description="Long-range accuracy (B2): held-out rows of this length; "
                                                        "valid/long_range_acc is next-token accuracy at positions >= "
                                                        "model.attention.sw_window, valid/short_range_acc below it.")
    long_range_batches: PositiveInt = Field(description="Long-range accuracy: held-out batches per source.")
    position_distances: list[Annotated[int, Field(ge=2)]] = Field(
        min_length=1, description="Position probe (E1): a marker token A is followed by B; after this many tokens "
                                  "of held-out text A appears again and the model must predict B.")
    position_items: PositiveInt = Field(description="Position probe: items per distance.")
    heatmap_steps: list[PositiveInt] = Field(description="Steps (at evaluations) at which per-layer, per-head "
                                                         "attention maps of a fixed held-out sequence are saved as "
                                                         "PNGs (B2, E2).")
    heatmap_seq_len: PositiveInt = Field(description="Length of the heatmaps' held-out sequence (maps are T x T).")

    @model_validator(mode="after")
    def check_items(self) -> "ProbesSpec":
        if self.enabled and not self.reasoning_items + self.arithmetic_items:
            raise ValueError("reasoning_items + arithmetic_items must be > 0 when probes are enabled")
        if self.reasoning_sources and not self.reasoning_items:
            raise ValueError("reasoning_sources is set but reasoning_items = 0")
        return self
