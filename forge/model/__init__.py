"""The Phase 1 (Cognate) model: Titans-MAG backbone, long-term memory, MAG gate, TRM recursion, ACT halting.

    model = build_model(spec.model, spec.objective)
    out = model(idx, targets, act_loss_weight=w, halt=False, return_logits=False)   # ModelOutput, this batch's
    # a training step: out.loss on the step's batch (global under DDP) and the ACT EMA: forge.train.objective
    export = load_export("OUT/")      # a `forge export` folder: .model, .tokenizer, .config, .metadata
"""
from forge.model.attention import Attention, attention_modules
from forge.model.build import COMPONENTS, build_model, count_parameters
from forge.model.export import load_export
from forge.model.model import IGNORE_INDEX, CognateModel, ModelOutput

__all__ = ["Attention", "CognateModel", "COMPONENTS", "IGNORE_INDEX", "ModelOutput", "attention_modules",
           "build_model", "count_parameters", "load_export"]
