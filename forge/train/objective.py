"""A training step's objective: the loss of the batch the step trains on, between the model and the optimizer.

The model's forward is local: its loss and metrics are those of the rows it was given
(forge.model.objective.composite_loss on LOCAL). Under data parallelism a step's batch is the global batch of
every rank, so its loss is composed again from the forward's LossTerms with the collectives here
(forge.distributed):

    token counts  losses and accuracies divide by the global count of valid targets / W (DDP then averages
                  the ranks' gradients: exactly the gradient of the global mean)
    batch terms   coherence / diversity on the pooled rows of every rank (gather_rows, differentiable);
                  embedding_diversity on the per-token rows of every rank
    ACT EMA       the global batch's per-step accuracy folds into trm.act.ema_acc, identically on every rank

    out = model(idx, targets, act_loss_weight=w)        # or its DDP wrapper
    loss = training_loss(model, out, w, step_batch(world))
"""
from __future__ import annotations

import torch

from forge import distributed
from forge.distributed import World
from forge.model.model import CognateModel, ModelOutput
from forge.model.objective import LOCAL, Batch, composite_loss, embedding_diversity


def step_batch(world: World) -> Batch:
    """The batch a training step's loss is defined on: the process's own rows, or every rank's under DDP."""
    if not world.distributed:
        return LOCAL
    return Batch(world.size, distributed.all_reduce_sum, distributed.gather_rows)


def training_loss(model: CognateModel, out: ModelOutput, act_loss_weight: float, batch: Batch) -> torch.Tensor:
    """The loss a training forward backpropagates, on `batch`; out.loss and out.metrics then describe that
    batch. Folds the batch's per-step token accuracy into the ACT accuracy EMA (the halting head's buffer
    trm.act.ema_acc, model state) and logs it (act/ema_acc_stepN). Every rank calls it after every training
    forward (collectives)."""
    if batch is not LOCAL:      # the forward's loss is its own rows': redefine it on the global batch
        out.loss, metrics = composite_loss(out.terms, model.spec, model.objective, act_loss_weight, batch)
        metrics["embedding_diversity"] = embedding_diversity(out.terms.x, batch)
        out.metrics.update(metrics)
    if model.trm is not None and len(out.terms.correct) == model.n_steps:
        accuracy = torch.stack([out.metrics[f"accuracy/step_{t}"] for t in range(model.n_steps)])
        act = model.trm.act
        act.update_ema(batch.mean(accuracy))
        out.metrics.update({f"act/ema_acc_step{t}": act.ema_acc[t].detach().clone() for t in range(model.n_steps)})
    return out.loss
