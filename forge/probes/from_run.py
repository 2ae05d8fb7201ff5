"""`forge sample`: generate text from a run's checkpoint. Reads the run directory only: its resolved spec,
its tokenizer (tokenizer.json, written at the start of training) and a verified checkpoint's weights."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from forge.errors import ForgeError


@dataclass
class RunSamples:
    run_id: str
    step: int
    prompt: str
    samples: list[str]
    avg_steps: float            # outer steps per generated token (ACT halting; t_max with full depth)
    t_max: int
    tokens_per_sec: float
    cached: bool


def load_run_model(run_path: Path, step: int | None = None):
    """(spec, model in eval mode with the checkpoint's weights, tokenizer, step). The newest valid
    checkpoint unless `step` is given."""
    from safetensors.torch import load_model

    from forge.data.tokenizer import Tokenizer
    from forge.model import build_model
    from forge.train import checkpoint as ckpt
    from forge.train.run_dir import RunDir

    spec = RunDir(run_path).resolved_spec().spec
    root = run_path / "checkpoints"
    if step is None:
        path = ckpt.latest_valid(root)
        if path is None:
            raise ForgeError(f"run {run_path.name} has no valid checkpoint to sample from")
    else:
        path = root / ckpt.step_dir_name(step)
        problem = ckpt.verify(path) if path.is_dir() else "no such checkpoint"
        if problem:
            kept = ", ".join(str(ckpt.step_of(p)) for p in ckpt.list_checkpoints(root)) or "none"
            raise ForgeError(f"checkpoint at step {step} of {run_path.name}: {problem} (kept steps: {kept})")
    tokenizer_path = run_path / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise ForgeError(f"{tokenizer_path} is missing (runs started before forge wrote it cannot be sampled)")
    model = build_model(spec.model, spec.objective)
    load_model(model, str(path / "model.safetensors"))
    return spec, model.eval(), Tokenizer.load(tokenizer_path), ckpt.step_of(path)


def sample_run(run_path: Path, *, step: int | None, prompt: str, n: int, max_tokens: int | None,
               temperature: float | None, top_k: int | None, seed: int, full_depth: bool,
               cached: bool = True, skip_halted: bool = False) -> RunSamples:
    """n samples continuing `prompt` (after an eos: documents start after one in training). Unset sampling
    settings come from the run's [probes] section. skip_halted: halted tokens skip the later outer steps (an
    approximation of the model, forge.model.decode)."""
    import torch

    if skip_halted and not cached:
        raise ForgeError("--skip-halted needs the cached decoder: drop --no-cache")
    from forge.probes.sampling import generate

    spec, model, tokenizer, used_step = load_run_model(run_path, step)
    probes = spec.probes
    ids = [tokenizer.eos_id] + tokenizer.encode(prompt)
    prompts = torch.tensor([ids] * n, dtype=torch.long)
    gen = generate(model, prompts, max_tokens or probes.sample_new_tokens,
                   temperature=probes.sample_temperature if temperature is None else temperature,
                   top_k=probes.sample_top_k if top_k is None else top_k, seed=seed, eos_id=tokenizer.eos_id,
                   halt=not full_depth, cached=cached, skip_halted=skip_halted)
    return RunSamples(run_path.name, used_step, prompt, [tokenizer.decode(t) for t in gen.tokens], gen.avg_steps,
                      model.n_steps, gen.tokens_per_sec, cached)
