"""The 2-process side of tests/test_distributed.py, started once per test module by torch's launcher:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py OUT

Every scenario drives the real Trainer (DDP, gloo) on the tiny spec and writes what each rank saw to
OUT/<scenario>-rank<r>.json; the single-process references live in the test module (same builders).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_common import TAU_QUIET, latest_checkpoint, make_trainer, save_parameters  # noqa: E402

from forge import distributed  # noqa: E402
from forge.optim import clippable_modules, qk_clip  # noqa: E402


def write(out: Path, name: str, world, **values) -> None:
    (out / f"{name}-rank{world.rank}.json").write_text(json.dumps(values))


def main(out: Path) -> None:
    world = distributed.init_from_env("cpu")

    # equivalence with 1 process x B (and replicas) over 10 steps; resume a 1-process checkpoint on 2
    trainer = make_trainer(out / "runs", "ddp10", world)
    status = trainer.run_until(10)
    save_parameters(trainer, out, "ddp10", world.rank)
    write(out, "ddp10", world, status=status, clipped=trainer.counters.qk_clip_total,
          replicas=distributed.replicas_identical(trainer.parts.model, trainer.parts.device))

    # the same with owner-sharded Newton-Schulz
    trainer = make_trainer(out / "runs", "sharded10", world, extra=("optim.muon.shard_newton_schulz=true",))
    status = trainer.run_until(10)
    save_parameters(trainer, out, "sharded10", world.rank)
    owned = sorted(set(trainer.parts.optimizer.muon._owners().values()))
    write(out, "sharded10", world, status=status, owners=owned,
          replicas=distributed.replicas_identical(trainer.parts.model, trainer.parts.device))

    trainer = make_trainer(out / "runs", "single5", world, create=False)
    trainer.restore(latest_checkpoint(out / "runs" / "single5"))
    status = trainer.run_until(10)
    if world.main:
        save_parameters(trainer, out, "resume12", 0)
    write(out, "resume12", world, status=status, step=trainer.counters.step)

    # a 2-process checkpoint at step 5, resumed on 1 process by the test
    trainer = make_trainer(out / "runs", "ddp5", world)
    write(out, "ddp5", world, status=trainer.run_until(5))

    # a NaN on rank 1 only: both ranks skip the same step
    trainer = make_trainer(out / "runs", "nan", world)
    model = trainer.parts.model
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        if world.rank == 1 and calls["n"] == 3:   # the step's loss is composed from the terms on the global batch
            output.terms.ce_sums[0] = output.terms.ce_sums[0] * float("nan")
        return output

    hook = model.register_forward_hook(poison)
    status = trainer.run_until(3)
    hook.remove()
    write(out, "nan", world, status=status, skipped=trainer.parts.optimizer.skipped_steps,
          nonfinite=trainer.counters.nonfinite_total, steps=trainer.counters.step,
          replicas=distributed.replicas_identical(model, trainer.parts.device))

    # QK-clip: only rank 1's max logit exceeds tau; both ranks must clip the same head by the same factor
    spec = trainer.spec.optim.qk_clip.model_copy(update={"tau": TAU_QUIET})
    first = clippable_modules(model)[0]
    (idx, targets), = trainer.parts.loader.micro_batches(trainer.counters.step)[:1]
    trainer.forward_model(distributed.rank_slice(idx, world), distributed.rank_slice(targets, world)).loss.backward()
    model.zero_grad(set_to_none=True)
    local_max = [float(m.max_logit.max()) for m in clippable_modules(model)]
    if world.rank == 1:
        first.max_logit[0] = 4 * TAU_QUIET
    clipped = qk_clip(model, spec)
    write(out, "qkclip", world, clipped=clipped, local_max=local_max,
          replicas=distributed.replicas_identical(model, trainer.parts.device))

    # halting: rank 0 never halts, rank 1 halts every token at step 0 (evaluation rule); the training forward
    # still runs every outer step on both (deep supervision), so DDP's reduction and the replicas stay in step
    act = model.spec.act.model_copy(update={"halt_thresh": 1.0 if world.rank == 0 else 0.0})
    model.spec = model.spec.model_copy(update={"act": act})
    metrics = trainer.train_step(collect=True)
    out_steps = model(*(distributed.rank_slice(t, world) for t in trainer.parts.loader.micro_batches(0)[0]))
    write(out, "halting", world, halt_share_step0=float(out_steps.metrics["act/halt_share_step0"]),
          outer_steps=len(out_steps.ce_per_step), logged_share=float(metrics["act/halt_share_step0"]),
          replicas=distributed.replicas_identical(model, trainer.parts.device))
    distributed.shutdown()
    distributed.exit_worker(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
