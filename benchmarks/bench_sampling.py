"""Sampling speed of `forge sample` on the tiny model (CPU): tokens/s of forge.probes.sampling.generate, the
code as it is against the code of a git revision ("before", default b634b67: the decoder before issue 18),
interleaved round by round in one process; and whether both give the same tokens under the same seed.

The model is specs/tiny.toml's (0.81M parameters, random weights from a fixed seed) with a halting head that
halts some tokens early (as tests/test_sampling.py does), so that ACT halting is exercised; a 25-token
prompt of seeded random ids, sampling as the probes do (temperature 0.8, top-k 40), no eos (every row
generates --tokens tokens). A third column runs the decoder with skip_halted (halted tokens frozen, their later
outer steps skipped: an approximation of the model, so its tokens are not compared, only its speed and steps).
The tokens/s include the prefill and the sampling (generate's own figure: wall time of the whole call).

    .venv/bin/python benchmarks/bench_sampling.py [--before REV] [--rounds 5] [--threads 2] [--quick] [--name N]
                                                                                       # results/sampling.json
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, setup_threads, table, write_result

from forge.model import build_model
from forge.probes import sampling
from forge.spec.load import load_spec


def module_at(rev: str, path: str, name: str, replace: dict[str, str] | None = None):
    """Import the file `path` as it was at git revision `rev`, as module `name` (imports rewritten by `replace`)."""
    text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
    for old, new in (replace or {}).items():
        text = text.replace(old, new)
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(text)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# b634b67's decoder predates the memory variants and act.head_input: as written it imports memory_update (gone)
# and runs the linear memory on the token embeddings and the halting head on z. These rewrites make it run
# today's model (specs/tiny.toml: the MLP memory after block 1, the halting head on the answer y) with its own
# structure otherwise unchanged: the memory path through NeuralMemory.init_state/step (what today's decoder
# calls), the halting head on act.head_input's state, TRM.initial_states. Strings absent from a revision (a
# later decoder) are left alone.
BEFORE_ON_TODAYS_MODEL = {
    "from forge.model.memory import memory_update\n": "",
    "        self._memory: _MemoryState | None = None\n        if model.spec.memory.enabled:":
        "        self._memory = model.memory.init_state(batch_size) if model.spec.memory.enabled else None\n"
        "        if False:",
    "        h0 = model.tok_emb(idx)\n        y = h0\n        for block in model.blocks:\n"
    "            y = self._block(block, y, rope, mask)\n":
        "        y = h0 = model.tok_emb(idx)\n        for i, block in enumerate(model.blocks, 1):\n"
        "            y = self._block(block, y, rope, mask)\n"
        "            h0 = y if i == model.spec.memory.input_layer else h0\n",
    "model.gate(y, self._read_and_write_memory(h0, start))[0]": "model.gate(y, model.memory.step(self._memory, h0))[0]",
    "model.trm.act(z_t)": "model.trm.act(y_t if model.spec.act.head_input == \"answer\" else z_t)",
    "y, z = x, torch.zeros_like(x)": "y, z = trm.initial_states(x)",
}


def tiny_model(seed: int):
    spec = load_spec(ROOT / "specs" / "tiny.toml").spec
    torch.manual_seed(seed)
    model = build_model(spec.model, spec.objective).eval()
    with torch.no_grad():                 # halt some tokens at step 1, some at 2, the rest at 3
        model.trm.act.weight.normal_(0, 0.5)
        model.trm.act.bias.fill_(0.0)
    return spec, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="b634b67", help="git revision of the 'before' decoder")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="samples generated at once (--n)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2: forge sample's default, every core)")
    parser.add_argument("--quick", action="store_true", help="1 round of 16 tokens; writes results/sampling_quick.json")
    parser.add_argument("--name", help="results/<name>.json [default: sampling, _threadsN, _quick as they apply]")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.tokens = 1, 16
    setup_threads(args.threads)
    old_decode = module_at(args.before, "forge/model/decode.py", "decode_before", BEFORE_ON_TODAYS_MODEL)
    old = module_at(args.before, "forge/probes/sampling.py", "sampling_before",
                    {"from forge.model.decode import": "from decode_before import"})
    spec, model = tiny_model(spec_seed := 0)
    prompt_ids = torch.randint(0, spec.model.vocab_size, (25,), generator=torch.Generator().manual_seed(1)).tolist()
    kw = dict(temperature=0.8, top_k=40, seed=0, eos_id=None)
    rows, results = [], {}
    for batch in args.batches:
        prompts = torch.tensor([prompt_ids] * batch)
        gens = {"before": [], "after": [], "skip_halted": []}
        runs = (("before", old.generate, {}), ("after", sampling.generate, {}),
                ("skip_halted", sampling.generate, {"skip_halted": True}))
        for r in range(args.rounds + 1):                   # round 0 warms up
            for name, gen, extra in runs:
                t0 = time.perf_counter()
                out = gen(model, prompts, args.tokens, **kw, **extra)
                seconds = time.perf_counter() - t0
                if r:
                    gens[name].append((batch * args.tokens / seconds, out))
        before = statistics.median(t for t, _ in gens["before"])
        after = statistics.median(t for t, _ in gens["after"])
        skip = statistics.median(t for t, _ in gens["skip_halted"])
        same = all(a.tokens == b.tokens and a.avg_steps == b.avg_steps
                   for (_, a), (_, b) in zip(gens["before"], gens["after"]))
        results[f"n{batch}"] = {"before_tokens_per_sec": before, "after_tokens_per_sec": after,
                                "speedup": after / before, "same_tokens": same,
                                "avg_steps": gens["after"][0][1].avg_steps,
                                "skip_halted_tokens_per_sec": skip, "skip_halted_speedup": skip / before,
                                "skip_halted_avg_steps": gens["skip_halted"][0][1].avg_steps}
        rows.append([batch, f"{before:,.0f}", f"{after:,.0f}", f"{after / before:.2f}x", "yes" if same else "NO",
                     f"{gens['after'][0][1].avg_steps:.2f}", f"{skip:,.0f}", f"{skip / before:.2f}x",
                     f"{gens['skip_halted'][0][1].avg_steps:.2f}"])
    results["n1_after_vs_before"] = results.get("n1", {}).get("speedup")
    print(table(["samples at once (--n)", "before tokens/s", "after tokens/s", "speedup", "same tokens",
                 "avg ACT steps", "skip_halted tokens/s", "speedup", "its avg steps"], rows))
    name = args.name or ("sampling" + ("" if args.threads == 2 else f"_threads{args.threads}")
                         + ("_quick" if args.quick else ""))
    write_result(name, {"before": args.before, "seed": spec_seed, "tokens": args.tokens,
                              "prompt_tokens": len(prompt_ids), "threads": args.threads, "results": results})


if __name__ == "__main__":
    main()
