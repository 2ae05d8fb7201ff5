"""[data]: the weighted source mixture, tokenizer, filters, packing, curriculum and held-out split.

Mixture weights are shares of *tokens* (after tokenisation and filtering), not of documents.
"""
from __future__ import annotations

import string
from typing import Annotated, Literal, Optional, Union

from pydantic import Field, PositiveInt, model_validator

from forge.spec.base import Section

Name = Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$")]


def template_fields(template: str) -> list[str]:
    """The field names a text_template refers to, in order (ValueError if it is no format string)."""
    return list(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(template) if f is not None))


class _SourceBase(Section):
    name: Name = Field(description="Source name, used in metrics (valid/<name>/...) and reports.")
    weight: float = Field(gt=0, le=1, description="Share of training tokens drawn from this source.")
    text_field: str = Field("text", min_length=1, description="Field of each record that holds the text "
                                                               "(unless text_template is set).")
    text_template: Optional[str] = Field(
        None, min_length=1,
        description="Build the text from several fields instead of text_field: a Python format string over "
                    "the record's fields, e.g. \"{question}\\n{answer}\" (literal braces doubled: {{ }}).")

    @model_validator(mode="after")
    def check_text(self) -> "_SourceBase":
        if self.text_template is None:
            return self
        if self.text_field != "text":  # (compared with the default: a dumped spec must validate again)
            raise ValueError("set either text_field or text_template, not both")
        try:
            fields = template_fields(self.text_template)
        except ValueError as err:
            raise ValueError(f"text_template is not a valid format string: {err}") from None
        if not fields or not all(f.isidentifier() for f in fields):
            raise ValueError("text_template must name record fields as {field} (plain names, no indexing or "
                             f"attributes); got {self.text_template!r}")
        return self

    def text_fields(self) -> list[str]:
        """The record fields the text is built from."""
        return [self.text_field] if self.text_template is None else template_fields(self.text_template)


class HubSource(_SourceBase):
    type: Literal["hub"] = Field(description="A Hugging Face hub dataset, loaded with `datasets` and cached "
                                             "(`forge data pull`).")
    dataset: str = Field(min_length=1, description="Hub dataset id, e.g. roneneldan/TinyStories.")
    config: Optional[str] = Field(None, description="Dataset configuration name.")
    split: str = Field("train", min_length=1, description="Split to train on.")
    eval_split: Optional[str] = Field(None, description="Split held out for evaluation; unset = hold out "
                                                        "data.eval.fraction of the training split.")
    revision: Optional[str] = Field(None, description="Hub revision (commit or tag) to pin.")


class LocalSource(_SourceBase):
    type: Literal["local"] = Field(description="Local files (JSONL / text / parquet) under the data root "
                                               "(--data-dir or $FORGE_DATA_DIR).")
    paths: list[str] = Field(min_length=1, description="Glob patterns relative to the data root (training files).")
    eval_paths: list[str] = Field(default_factory=list, description="Globs of held-out files; empty = hold out "
                                                                    "data.eval.fraction of the training documents.")
    format: Literal["jsonl", "text", "parquet"] = Field("jsonl", description="File format. jsonl/parquet: one "
                                                                             "document per record; text: one "
                                                                             "document per file (column 'text').")

    @model_validator(mode="after")
    def check_text_format(self) -> "LocalSource":
        if self.format == "text" and self.text_fields() != ["text"]:
            raise ValueError("format = \"text\" yields one field, 'text': leave text_field/text_template unset")
        return self


class BuiltinSource(_SourceBase):
    type: Literal["builtin"] = Field(description="Real text every Python installation carries; no data, no network.")
    corpus: Literal["python_stdlib", "pydoc_topics"] = Field(
        description="python_stdlib: the standard library's own .py sources (code); pydoc_topics: the "
                    "pydoc_data help topics (English technical prose).")
    max_documents: Optional[PositiveInt] = Field(None, description="Deterministic cap on documents: this many, "
                                                                   "evenly spaced over the sorted file/topic list.")

    @model_validator(mode="after")
    def check_plain_text(self) -> "BuiltinSource":
        if self.text_field != "text" or self.text_template is not None:
            raise ValueError("builtin corpora are plain text: leave text_field/text_template unset")
        return self


Source = Annotated[Union[HubSource, LocalSource, BuiltinSource], Field(discriminator="type")]


class TokenizerSpec(Section):
    type: Literal["byte_bpe"] = Field("byte_bpe", description="Byte-level BPE trained with `tokenizers` "
                                                              "(vocab size = model.vocab_size).")
    sample_bytes: PositiveInt = Field(description="Bytes of the mixture (deterministic sample) to train it on.")
    min_frequency: PositiveInt = Field(2, description="Minimum pair frequency for a merge.")


class FilterSpec(Section):
    min_length: int = Field(ge=0, description="Drop documents shorter than this many tokens.")
    max_length: PositiveInt = Field(description="Split documents longer than this many tokens.")
    quality_score: float = Field(ge=0, le=1, description="Drop documents whose quality score (see forge/data) is "
                                                         "at or below this.")

    @model_validator(mode="after")
    def check_lengths(self) -> "FilterSpec":
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) must be <= max_length ({self.max_length})")
        return self


class CurriculumStage(Section):
    from_step: int = Field(ge=0, description="First optimizer step of this stage.")
    seq_len: PositiveInt = Field(description="Sequence length from that step on.")


class EvalSpec(Section):
    fraction: float = Field(gt=0, lt=1, description="Share of each source's documents held out when it has no "
                                                    "explicit eval split (chosen by a hash of the text, so "
                                                    "identical documents never straddle the split).")
    max_batches: PositiveInt = Field(description="Batches per source in one evaluation.")


class DataSpec(Section):
    seq_len: PositiveInt = Field(description="Tokens per training sequence (before any curriculum stage).")
    batch_size: PositiveInt = Field(description="Sequences per optimizer step (the global batch).")
    grad_accum: PositiveInt = Field(1, description="Micro-batches per optimizer step (batch_size must divide evenly).")
    sources: list[Source] = Field(min_length=1, description="The mixture.")
    tokenizer: TokenizerSpec
    filters: FilterSpec
    curriculum: list[CurriculumStage] = Field(default_factory=list, description="Sequence-length curriculum.")
    eval: EvalSpec

    @model_validator(mode="after")
    def check_mixture(self) -> "DataSpec":
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique (repeated: {', '.join(dupes)})")
        total = sum(s.weight for s in self.sources)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"data.sources weights must sum to 1 (within 1e-6); they sum to {total:.6g}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        steps = [c.from_step for c in self.curriculum]
        if steps != sorted(set(steps)):
            raise ValueError("curriculum stages must have strictly increasing from_step")
        return self
