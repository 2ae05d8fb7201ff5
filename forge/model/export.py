"""The `forge export` folder: a checkpoint as a folder a Hugging Face user recognises, and its loader
(load_export). forge.train.export writes it from a run directory.

    OUT/model.safetensors        the weights; metadata: forge version, run id, step, spec hash, the tied head
    OUT/config.json              the model (and objective) section of the run's spec, ids of the special tokens
    OUT/tokenizer.json           the run's tokenizer (loads in tokenizers.Tokenizer / PreTrainedTokenizerFast)
    OUT/tokenizer_config.json    PreTrainedTokenizerFast settings: eos and pad tokens, the training context length
    OUT/special_tokens_map.json  eos and pad
    OUT/spec.toml                the run's resolved spec (what it trained with)
    OUT/README.md                a model card: what the model is, how to load it, the run's success table

The LM head is tied to the token embedding: the file stores `tok_emb.weight` once, and `lm_head` reads it
(metadata `tied_weights`). The architecture is forge's own (no transformers class), so the model loads with
`forge.model.load_export(OUT)`; the tokenizer and the weights need nothing from forge.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge.errors import ForgeError

MODEL_TYPE = "forge-cognate"
TIED = "lm_head.weight=tok_emb.weight"   # the head decodes with the embedding matrix (stored once)
FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "spec.toml", "README.md")


@dataclass
class Export:
    model: Any          # forge.model.CognateModel, eval mode, the exported weights
    tokenizer: Any      # forge.data.tokenizer.Tokenizer
    config: dict[str, Any]
    metadata: dict[str, str]


def load_export(path: str | Path) -> Export:
    """The model (eval mode, CPU, fp32) and tokenizer of a `forge export` folder. Weights load strictly."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    from forge.data.tokenizer import Tokenizer
    from forge.model.build import build_model
    from forge.spec.model import ModelSpec
    from forge.spec.objective import ObjectiveSpec

    path = Path(path)
    missing = [name for name in ("model.safetensors", "config.json", "tokenizer.json") if not (path / name).is_file()]
    if missing:
        raise ForgeError(f"{path} is not a forge export: {', '.join(missing)} missing")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != MODEL_TYPE:
        raise ForgeError(f"{path / 'config.json'}: model_type {config.get('model_type')!r} is not {MODEL_TYPE!r}")
    model = build_model(ModelSpec.model_validate(config["model"]), ObjectiveSpec.model_validate(config["objective"]))
    load_model(model, str(path / "model.safetensors"))
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata() or {}
    return Export(model.eval(), Tokenizer.load(path / "tokenizer.json"), config, metadata)
