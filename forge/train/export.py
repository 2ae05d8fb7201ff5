"""`forge export RUN [--step N] OUT/`: write a run's checkpoint as the folder forge.model.export describes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from forge.errors import ForgeError
from forge.model.export import MODEL_TYPE, TIED


def write_export(run_path: Path, out: Path, step: int | None = None) -> Path:
    """Export checkpoint `step` (default: the newest valid one) of the run at `run_path` into `out`, which must
    not exist or be empty. Written into a temporary sibling and renamed: never half an export."""
    from safetensors.torch import save_model

    import forge
    from forge.probes.from_run import load_run_model
    from forge.train.checkpoint import chmod_like_open
    from forge.train.run_dir import RunDir

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ForgeError(f"{out} exists and is not an empty directory; export into a new one")
    spec, model, tokenizer, used_step = load_run_model(run_path, step)
    run = RunDir(run_path)
    lineage = run.read("lineage.json")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    metadata = {"format": "pt", "forge_version": forge.__version__, "model_type": MODEL_TYPE,
                "run_id": run_path.name, "step": str(used_step), "spec_hash": lineage["spec_hash"],
                "tied_weights": TIED}
    save_model(model, str(tmp / "model.safetensors"), metadata=metadata)
    chmod_like_open(tmp / "model.safetensors")
    spec_text = (run_path / "spec.toml").read_text(encoding="utf-8")
    config = {"model_type": MODEL_TYPE, "architectures": ["CognateModel"], "forge_version": forge.__version__,
              "vocab_size": spec.model.vocab_size, "hidden_size": spec.model.d_model,
              "num_hidden_layers": spec.model.n_layers, "num_attention_heads": spec.model.n_heads,
              "max_position_embeddings": spec.data.seq_len, "tie_word_embeddings": True, "torch_dtype": "float32",
              "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
              "model": spec.model.model_dump(mode="json"), "objective": spec.objective.model_dump(mode="json"),
              "run_id": run_path.name, "step": used_step, "spec_hash": lineage["spec_hash"]}
    _write_json(tmp / "config.json", config)
    shutil.copyfile(run_path / "tokenizer.json", tmp / "tokenizer.json")
    eos, pad = tokenizer.inner.id_to_token(tokenizer.eos_id), tokenizer.inner.id_to_token(tokenizer.pad_id)
    _write_json(tmp / "special_tokens_map.json", {"eos_token": eos, "pad_token": pad})
    _write_json(tmp / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": pad,
        "model_max_length": spec.data.seq_len, "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False})
    (tmp / "spec.toml").write_text(spec_text, encoding="utf-8")
    (tmp / "README.md").write_text(_model_card(run, spec, config, used_step), encoding="utf-8")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _model_card(run, spec, config: dict, step: int) -> str:
    from forge.model.build import build_model, count_parameters
    from forge.report.criteria import RunRecord, success_criteria

    params = count_parameters(build_model(spec.model, spec.objective, device="meta"))["total"]
    rows = "\n".join(f"| {c.name} | {c.shown()} | {c.target} | {c.status} |"
                     for c in success_criteria(RunRecord.load(run)))
    sources = ", ".join(s.name for s in spec.data.sources)
    return f"""---
library_name: forge
tags: [forge, {MODEL_TYPE}, titans-mag, trm, act]
---
# {run.run_id} (step {step})

A {params / 1e6:.2f}M-parameter Phase 1 ("Cognate") language model trained by forge: a Titans-MAG backbone
(causal sliding-window attention + a test-time-learning long-term memory, blended by a MAG gate), TRM
recursion ({spec.model.trm.t_max} outer steps, deep supervision) and an ACT halting head. Vocabulary
{spec.model.vocab_size}, context {spec.data.seq_len} tokens during training, data: {sources}.
Spec hash `{config['spec_hash'][:12]}` (the resolved spec is `spec.toml`).

## Load

```python
from forge.model import load_export          # pip install forge-cognate; the architecture is forge's own
export = load_export("path/to/this/folder")
logits = export.model(idx).logits             # idx: (B, T) token ids

from transformers import PreTrainedTokenizerFast   # the tokenizer needs nothing from forge
tok = PreTrainedTokenizerFast.from_pretrained("path/to/this/folder")   # eos and pad set
```

The weights also load with `safetensors.torch.load_file("model.safetensors")`; the LM head is tied to the
token embedding, stored once as `tok_emb.weight` (metadata `tied_weights`).

## Success criteria of the run (forge report {run.run_id})

| criterion | measured | target | status |
|---|---|---|---|
{rows}
"""
