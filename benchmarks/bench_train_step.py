"""Training throughput and MFU of `forge train`'s step, with a per-component breakdown.

    .venv/bin/python benchmarks/bench_train_step.py [--threads 2] [--rounds 2] [--batch 8] [--quick]
                                                    [--device cpu|cuda|auto] [--cases NAME ...] [--core]
                                                    [--steps-only [--no-sections]] [--name NAME]

Per spec (phase1 and its AdamW variant, the same-size baseline, tiny and the tiny baseline; --batch sets
data.batch_size, sequence length from the spec): the model, optimizer and schedule built from the spec
exactly as `forge train` builds them, driven by forge.train.loop.Trainer.train_step on random tokens (the
step's cost does not depend on the text). Cases interleave round by round; medians and mins of --rounds
timed rounds after one warm-up round.

On CPU (the default) every case trains in fp32 (train.precision = fp32) except "phase1 auto", the phase1
spec as shipped (train.precision = optim.muon.ns_dtype = "auto": bf16 autocast and bf16 Newton-Schulz where
the CPU computes bf16 natively, fp32 where it does not; forge.train.precision), and "phase1 auto, fp32 NS"
(the same with fp32 Newton-Schulz: the A/B of the optimizer's share). On CUDA (--device cuda):
phase1, the baseline and tiny at --batch (default 32) with each spec's own precision (phase1: auto,
tiny: fp32), every timing between torch.cuda.synchronize() calls, plus torch.cuda.max_memory_allocated over
one step of each case; writes results/train_step_cuda.json.

  step          Trainer.train_step(collect=False): the step `forge train` runs between logging steps
  logging step  Trainer.train_step(collect=True): + every metric family (amortised over logging.every)
  sections      the same calls timed one by one: forward, backward, optimizer, QK-clip (the clip itself)
  no max-logit  forward + backward with QK-clip's max-logit tracking off (its cost = the difference)
  components    forward + backward of each part alone on fixed inputs: backbone blocks, memory + MAG gate,
                TRM recursion, LM head + losses (deep supervision CE, ACT BCE, coherence, diversity)

MFU = tokens/s x model FLOPs per token (forge.model.flops.model_flops_per_token, counted from the spec) / the
matmul peak measured in the same process, interleaved with the steps round by round so that outside load hits
both alike (median round; CPU n = 2048, CUDA n = 8192; an emulated bf16 at n = 256): `mfu` against the peak of
the dtype the step's matmuls run in (fp32, or bf16 under autocast), and both `mfu_fp32_peak` and
`mfu_bf16_peak`; `mfu_best` from the fastest round. The result records the CPU's capability flags
(common.cpu_flags). Writes benchmarks/results/train_step.json (--name: another name, e.g. train_step_avx2
for the AVX2-only machine kind, so that one kind's figures do not overwrite another's).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from forge.model.flops import model_flops_per_token
from common import (add_device_option, device_sync, interleaved, resolve_device, setup_threads, summary, table,
                    write_result)
from forge.model import build_model
from forge.model.act import halting_loss
from forge.model.objective import coherence_loss, diversity_penalty
from forge.optim import QKClip, build_lr_schedule, build_optimizer, qk_clip, set_max_logit_tracking
from forge.spec.load import load_spec
from forge.train.components import Components
from forge.train.loop import Trainer
from forge.train.perf import matmul_peak_flops
from forge.train.precision import resolve_precision

FP32 = ["train.precision=fp32"]
EMULATED_BF16_N = 256     # the bf16 peak's matmul size where bf16 is emulated (forge.train.precision's probe)
CASES = {   # name -> (spec, overrides), on CPU
    "phase1": ("specs/phase1.toml", FP32),
    "phase1 auto": ("specs/phase1.toml", []),             # as shipped: bf16 where native (NS too), else fp32
    "phase1 auto, fp32 NS": ("specs/phase1.toml", ["optim.muon.ns_dtype=fp32"]),
    "phase1 + AdamW": ("specs/phase1.toml", ["optim.name=adamw", *FP32]),
    "baseline (AdamW)": ("specs/baseline.toml", FP32),
    "tiny": ("specs/tiny.toml", []),
    "tiny baseline (AdamW)": ("specs/tiny_baseline_local.toml", []),
}
CUDA_CASES = {   # on a GPU: each spec's own precision (phase1 and the baseline: bf16; tiny: fp32)
    "phase1": ("specs/phase1.toml", []),
    "baseline (AdamW)": ("specs/baseline.toml", []),
    "tiny": ("specs/tiny.toml", []),
}


class RandomTokens:
    """The TrainLoader interface Trainer.train_step reads: fixed random micro-batches of the spec's shape."""

    def __init__(self, vocab: int, batch: int, seq_len: int, grad_accum: int):
        gen = torch.Generator().manual_seed(0)
        rows = batch // grad_accum
        self.batches = [(torch.randint(vocab, (rows, seq_len + 1), generator=gen),) for _ in range(grad_accum)]

    def micro_batches(self, step: int):
        return [(b[0][:, :-1], b[0][:, 1:]) for b in self.batches]


def build_trainer(path: str, overrides: list[str], device: torch.device = torch.device("cpu")) -> Trainer:
    """The model (on `device`), optimizer and schedule as `forge train` builds them; random-token batches (on
    CPU, moved to the device by train_step as real batches are)."""
    resolved = load_spec(path, overrides)
    spec = resolved.spec
    torch.manual_seed(spec.run.seed)
    model = build_model(spec.model, spec.objective).to(device)
    clip = QKClip(spec.optim.qk_clip, model)              # max-logit tracking on iff QK-clip is enabled
    precision = resolve_precision(spec.train.precision, device)
    optimizer = build_optimizer(spec.optim, model, precision)
    loader = RandomTokens(spec.model.vocab_size, spec.data.batch_size, spec.data.seq_len, spec.data.grad_accum)
    parts = Components(model, optimizer, build_lr_schedule(spec.train, optimizer), None, loader, device, clip,
                       precision)
    return Trainer(resolved, None, parts, None, None, None)


def device_batch(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    (idx, targets), = trainer.parts.loader.micro_batches(0)
    return idx.to(trainer.parts.device), targets.to(trainer.parts.device)


def sectioned_step(trainer: Trainer, sections: dict[str, list[float]]) -> None:
    """The calls of train_step, timed one by one (single micro-batch specs), under the step's autocast."""
    model, opt, spec = trainer.parts.model, trainer.parts.optimizer, trainer.spec
    sync = device_sync(trainer.parts.device) or (lambda: None)
    idx, targets = device_batch(trainer)
    sync()
    marks = [time.perf_counter()]
    with trainer._autocast():
        out = model(idx, targets, act_loss_weight=trainer.act_loss_weight(trainer.counters.step))
        sync()
        marks.append(time.perf_counter())
        out.loss.backward()
    sync()
    marks.append(time.perf_counter())
    opt.step(collect_metrics=False)
    sync()
    marks.append(time.perf_counter())
    qk_clip(model, spec.optim.qk_clip)
    sync()
    marks.append(time.perf_counter())
    opt.zero_grad(set_to_none=True)
    for name, a, b in zip(("forward", "backward", "optimizer", "qk_clip"), marks, marks[1:]):
        sections[name].append(b - a)


def fwd_bwd(trainer: Trainer, track_max_logit: bool):
    model = trainer.parts.model
    idx, targets = device_batch(trainer)

    def run():
        set_max_logit_tracking(model, track_max_logit)
        with trainer._autocast():
            model(idx, targets).loss.backward()
        model.zero_grad(set_to_none=True)
        set_max_logit_tracking(model, trainer.spec.optim.qk_clip.enabled)
    return run


def component_cases(trainer: Trainer) -> dict:
    """Forward + backward of each part of the model alone, on fixed random inputs of the step's shape, under
    the step's autocast."""
    model, spec, device = trainer.parts.model, trainer.spec, trainer.parts.device
    idx, targets = device_batch(trainer)
    B, T = idx.shape
    gen = torch.Generator().manual_seed(1)

    def leaf():
        return torch.randn(B, T, spec.model.d_model, generator=gen).to(device).requires_grad_()

    h0, y, m, x = leaf(), leaf(), leaf(), leaf()
    grad = torch.randn(B, T, spec.model.d_model, generator=gen).to(device)
    rope = model.rope(T, idx.device)
    n_steps = model.n_steps
    step_states = [leaf() for _ in range(n_steps)]

    def done():
        model.zero_grad(set_to_none=True)
        for t in (h0, y, m, x, *step_states):
            t.grad = None

    def backbone():
        u = h0
        for block in model.blocks:
            u = block(u, rope)
        (u * grad).sum().backward()
        done()

    def memory_gate():
        mem, _ = model.memory(h0)
        out, _, entropy = model.gate(y, mem)
        ((out * grad).sum() - entropy).backward()
        done()

    def trm():
        total = sum((yt * grad).sum() + (zt * grad).sum() for yt, zt in model.trm.steps(x, rope))
        total.backward()
        done()

    def head_and_losses():
        loss = coherence_loss(x, spec.objective.coherence_temperature) + diversity_penalty(x)
        for t, state in enumerate(step_states):
            logits = model.lm_head(state)
            loss = loss + model.step_weights[t] * F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            if model.trm is not None:
                correct = logits.detach().argmax(-1) == targets
                valid = torch.ones_like(correct)
                loss = loss + halting_loss(model.trm.act(state), correct, valid, valid.sum())
        loss.backward()
        done()

    def autocast(fn):
        def run():
            with trainer._autocast():
                fn()
        return run

    cases = {"backbone": autocast(backbone), "lm_head + losses": autocast(head_and_losses)}
    if model.trm is not None:
        cases["trm"] = autocast(trm)
    if spec.model.memory.enabled:
        cases["memory + gate"] = autocast(memory_gate)
    return cases


def cuda_step_memory(trainer: Trainer) -> dict[str, float]:
    """torch.cuda.max_memory_allocated over one step of this case: the peak, and its excess over what was
    allocated before the step (the other cases' models and optimizer states stay resident in this process;
    bench_memory.py measures one spec per process)."""
    device = trainer.parts.device
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    trainer.train_step(collect=False)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"max_memory_allocated_gb": peak / 1e9, "step_peak_over_resident_gb": (peak - before) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, help="data.batch_size of the phase1-size specs (and of tiny on "
                                                   "CUDA); default 8 on CPU, 32 on CUDA")
    parser.add_argument("--quick", action="store_true", help="tiny specs only, one round (seconds)")
    parser.add_argument("--cases", nargs="+", help="only these cases (names as in the table)")
    parser.add_argument("--core", action="store_true", help="step, sections and the max-logit pair only (no "
                                                            "logging step, no components): a third of the time")
    parser.add_argument("--steps-only", action="store_true", help="step and sections only (MFU and the "
                                                                  "optimizer's share)")
    parser.add_argument("--name", help="results/NAME.json (default train_step, train_step_cuda or "
                                       "train_step_quick): keeps another machine kind's figures")
    parser.add_argument("--no-sections", action="store_true", help="with --steps-only: the step alone (no "
                                                                   "optimizer share; half the time)")
    add_device_option(parser)
    args = parser.parse_args()
    setup_threads(args.threads)
    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    batch = args.batch or (32 if on_cuda else 8)
    rounds = 1 if args.quick else args.rounds

    specs = CUDA_CASES if on_cuda else CASES
    names = [n for n in specs if n.startswith("tiny")] if args.quick else list(args.cases or specs)
    trainers = {}
    for name in names:
        path, overrides = specs[name]
        if on_cuda or not name.startswith("tiny"):
            overrides = [*overrides, f"data.batch_size={batch}"]
        trainers[name] = build_trainer(path, overrides, device)

    # the step of every spec, interleaved round by round; the breakdown cases of each spec next to it
    cases, sections = {}, {}
    n = 8192 if on_cuda else 2048
    # an emulated bf16 (AVX2-only CPUs: >100x slower than fp32) is timed on a small matmul, else one n = 2048
    # round of it would take minutes; its rate is what the table's bf16 column divides by all the same
    sizes = {"fp32": n, "bf16": n if resolve_precision("auto", device).bf16_native else EMULATED_BF16_N}
    for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):   # the peaks, interleaved with the steps
        cases[f"peak|{p}"] = lambda dtype=dtype, m=sizes[p]: matmul_peak_flops(device, n=m, repeats=2, dtype=dtype)
    for name, tr in trainers.items():
        cases[f"{name}|step"] = lambda tr=tr: tr.train_step(collect=False)
        if not (args.core or args.steps_only):
            cases[f"{name}|logging step"] = lambda tr=tr: tr.train_step(collect=True)
        sections[name] = {k: [] for k in ("forward", "backward", "optimizer", "qk_clip")}
        if not args.no_sections:
            cases[f"{name}|sections"] = lambda tr=tr, s=sections[name]: sectioned_step(tr, s)
        if tr.spec.optim.qk_clip.enabled and not args.steps_only:
            cases[f"{name}|no max-logit fwd+bwd"] = fwd_bwd(tr, track_max_logit=False)
            cases[f"{name}|fwd+bwd"] = fwd_bwd(tr, track_max_logit=True)
        for part, fn in ({} if args.core or args.steps_only else component_cases(tr)).items():
            cases[f"{name}|component {part}"] = fn
    # each peak case times 3 matmuls (a warm-up and 2 repeats); the median round's rate stands for the peak
    times = interleaved(cases, rounds, warmup=1, sync=device_sync(device))
    peaks = {p: 3 * 2 * sizes[p] ** 3 / statistics.median(times[f"peak|{p}"]) for p in ("fp32", "bf16")}
    peak = peaks["fp32"]
    for name, s in sections.items():   # the warm-up round's sections are dropped too
        for k in s:
            s[k] = s[k][1:]
    memory = {name: cuda_step_memory(tr) for name, tr in trainers.items()} if on_cuda else {}

    results, rows = {}, []
    for name, tr in trainers.items():
        spec = tr.spec
        tokens = spec.data.batch_size * spec.data.seq_len
        flops = model_flops_per_token(spec.model, spec.data.seq_len)
        step = summary(times[f"{name}|step"])
        logging = summary(times.get(f"{name}|logging step", times[f"{name}|step"]))
        own_peak = peaks[tr.precision.name]         # the dtype the step's matmuls run in (train.precision resolved)
        res = {"spec": specs[name][0], "overrides": specs[name][1], "batch": spec.data.batch_size,
               "seq_len": spec.data.seq_len, "device": str(device), "precision": tr.precision.name,
               "precision_setting": spec.train.precision,
               "ns_dtype": tr.parts.optimizer.muon.param_groups[0]["ns_dtype"] if tr.parts.optimizer.muon else None,
               "params": sum(p.numel() for p in tr.parts.model.parameters()),
               "step": step, "logging_step": logging,
               "tokens_per_s": tokens / step["median_s"], "tokens_per_s_best": tokens / step["min_s"],
               "flops_per_token": flops["total"],
               "mfu": tokens / step["median_s"] * flops["total"] / own_peak,
               "mfu_best": tokens / step["min_s"] * flops["total"] / own_peak,
               "mfu_fp32_peak": tokens / step["median_s"] * flops["total"] / peaks["fp32"],
               "mfu_bf16_peak": tokens / step["median_s"] * flops["total"] / peaks["bf16"],
               **memory.get(name, {}),
               "metrics_overhead_per_logging_step_s": logging["median_s"] - step["median_s"],
               "sections_s": {k: statistics.median(v) for k, v in sections[name].items() if v},
               "components_s": {k.split("component ")[1]: statistics.median(v) for k, v in times.items()
                                if k.startswith(f"{name}|component ")}}
        if f"{name}|fwd+bwd" in times:
            res["max_logit_tracking_s"] = (statistics.median(times[f"{name}|fwd+bwd"])
                                           - statistics.median(times[f"{name}|no max-logit fwd+bwd"]))
        results[name] = res
        rows.append([name, res["precision"], f"{res['params']:,}", f"{res['batch']}x{res['seq_len']}",
                     f"{step['median_s']:.3f}", f"{step['min_s']:.3f}", f"{res['tokens_per_s']:.0f}",
                     f"{res['mfu']:.0%}", f"{res['mfu_fp32_peak']:.0%}", f"{res['mfu_bf16_peak']:.0%}",
                     f"{res['flops_per_token'] / 1e6:.0f}"]
                    + ([f"{res['max_memory_allocated_gb']:.2f}"] if on_cuda else []))
    print(f"{device} matmul peaks (median round, interleaved with the steps): fp32 {peaks['fp32'] / 1e9:.1f} "
          f"(n={sizes['fp32']}), bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s (n={sizes['bf16']})")
    print(table(["spec", "precision", "params", "batch x seq", "step (s)", "min (s)", "tokens/s", "MFU (own dtype)",
                 "MFU (fp32 peak)", "MFU (bf16 peak)", "MFLOP/token"] + (["max allocated (GB)"] if on_cuda else []),
                rows))
    for name, res in results.items():
        parts = {**res["sections_s"], **{f"c:{k}": v for k, v in res["components_s"].items()}}
        print(name, " ".join(f"{k}={v:.3f}" for k, v in parts.items()),
              f"max_logit={res.get('max_logit_tracking_s', 0):.3f} metrics={res['metrics_overhead_per_logging_step_s']:.3f}")
    name = args.name or "train_step" + ("_cuda" if on_cuda else "") + ("_quick" if args.quick else "")
    write_result(name, {"threads": args.threads, "rounds": rounds, "device": str(device), "peak_flops": peak,
                        "peak_flops_by_dtype": peaks, "peak_n_by_dtype": sizes, "cases": results})


if __name__ == "__main__":
    main()
