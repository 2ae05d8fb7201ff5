"""Text generation from the model: temperature / top-k sampling under a seeded generator, with ACT halting
at inference (or full depth), incremental (cached, forge.model.decode) or by a whole forward per token.

Both paths give the same tokens: the cached decoder reproduces the forward's logits (tested), and the same
generator draws the same numbers from the same distribution. Several samples (forge sample --n) run as one
batch; after the prefill the cached path runs on one thread (a token's operations are too small to split). A
dedicated torch.Generator keeps sampling out of the global RNG, so sampling during training never changes the
run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from forge.model.decode import IncrementalDecoder


@dataclass
class Generation:
    tokens: list[list[int]]     # per prompt: the generated ids, up to (not including) eos
    avg_steps: float            # mean outer steps used per generated token (ACT halting; t_max at full depth)
    tokens_per_sec: float       # generated tokens (all rows, eos included) per second of wall time
    cached: bool


def pick_next(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. temperature 0 = greedy; top_k 0 = the whole vocabulary."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # torch.multinomial's one-sample draw (argmax of p / q, q ~ Exp(1) from the generator: the Gumbel-max
    # trick), written out: the same numbers from the same generator, without multinomial's input check, whose
    # host sync every token would pay
    q = torch.empty_like(logits).exponential_(1, generator=generator)
    return logits.softmax(-1).div_(q).argmax(-1)


@torch.no_grad()
def generate(model, prompts: torch.Tensor, max_new_tokens: int, *, temperature: float, top_k: int, seed: int,
             eos_id: int | None = None, halt: bool = True, cached: bool = True,
             skip_halted: bool = False) -> Generation:
    """Continue every row of `prompts` (B, P) by up to max_new_tokens tokens; a row stops at eos (generation
    stops when every row has). halt=False forces full depth. skip_halted (cached only): halted tokens are
    frozen and skip the later outer steps, an approximation of the model (forge.model.decode) that is
    faster where tokens halt early; off, the tokens are the full model's. Leaves the model's train/eval mode as
    it was."""
    was_training = model.training
    model.eval()
    device = prompts.device
    generator = torch.Generator(device=device).manual_seed(seed)
    B = prompts.shape[0]
    seq = prompts
    out, steps = [], []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    if skip_halted and not cached:
        raise ValueError("skip_halted needs the cached decoder")
    decoder = IncrementalDecoder(model, B, capacity=prompts.shape[1] + max_new_tokens,
                                 skip_halted=skip_halted) if cached else None
    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        feed = prompts
        for i in range(max_new_tokens):
            if cached:
                step = decoder.step(feed, halt=halt, last_only=True)
                logits, used = step.logits[:, -1], step.used_steps[:, -1]
                if i == 0 and device.type == "cpu":
                    # after the prefill, one thread: a token's operations are too small to split, and splitting
                    # them costs (benchmarks/bench_sampling.py: 2 threads 4-8x slower on the 2-core CPU under load)
                    torch.set_num_threads(1)
            else:
                full = model(seq, halt=halt, return_logits=True)
                logits, used = full.logits[:, -1], full.used_steps[:, -1]
            if not halt:
                used = torch.full_like(used, model.n_steps)
            token = pick_next(logits, temperature, top_k, generator)
            if eos_id is not None:
                token = torch.where(done, eos_id, token)
            out.append(token)
            steps.append(used if eos_id is None else torch.where(done, 0, used))
            if eos_id is not None:
                done |= token == eos_id
            feed = token[:, None]
            if not cached:
                seq = torch.cat([seq, feed], dim=1)
            if eos_id is not None and bool(done.all()):    # the one host sync per token, only with an eos
                break
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)
    seconds = time.perf_counter() - start
    generated = torch.stack(out, 1).tolist()
    tokens = [row[:row.index(eos_id)] if eos_id is not None and eos_id in row else row for row in generated]
    counted = torch.stack(steps, 1)
    n_used = int((counted > 0).sum())
    return Generation(tokens, float(counted.sum()) / max(n_used, 1), B * len(out) / max(seconds, 1e-9), cached)

