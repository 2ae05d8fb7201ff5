"""The benchmarks' own measuring code: the analytic FLOP count, the same-size baselines, a script end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SPECS
from forge.model import build_model
from forge.model.build import count_parameters
from forge.spec.load import load_spec

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_roofline import counted_flops_per_token  # noqa: E402
from forge.model.flops import model_flops_per_token  # noqa: E402


LINEAR_MEMORY = ["model.memory.variant=linear", "model.memory.gates=fixed", "model.memory.conv_kernel=0",
                 "model.memory.qkv_activation=identity", "model.memory.input_layer=0"]


@pytest.mark.parametrize("name, overrides", [("tiny.toml", []), ("tiny.toml", LINEAR_MEMORY),
                                             ("tiny_baseline_local.toml", [])])
def test_analytic_flops_equal_torch_counter_on_every_matmul(name, overrides):
    # torch's counter sees every nn.Linear / bmm / convolution but not CPU SDPA: it must equal the analytic count
    # less attention (the shipped Titans memory: its causal convolution, the MLP memory's chunk updates)
    spec = load_spec(SPECS / name, overrides).spec
    torch.manual_seed(0)
    model = build_model(spec.model, spec.objective)
    analytic = model_flops_per_token(spec.model, 64)
    counted = counted_flops_per_token(model, 64, 1, spec.model.vocab_size, track_max_logit=False)
    assert counted == pytest.approx(analytic["total"] - analytic["attention"], rel=1e-3)
    assert analytic["attention"] > 0


def test_window_bounds_attention_flops():
    spec = load_spec(SPECS / "tiny.toml", ["model.trm.enabled=false"]).spec   # window 64
    per_token = [model_flops_per_token(spec.model, T)["attention"] for T in (256, 512, 1024)]
    # beyond the window every query attends to `window` keys: per-token attention cost approaches a constant
    assert per_token[2] / per_token[1] < 1.1
    full = load_spec(SPECS / "tiny.toml", ["model.trm.enabled=false", "model.attention.type=full"]).spec
    assert model_flops_per_token(full.model, 1024)["attention"] > 6 * per_token[2]


@pytest.mark.parametrize("baseline, stack", [("baseline.toml", "phase1.toml"),
                                             ("tiny_baseline_local.toml", "tiny_local.toml")])
def test_baselines_are_plain_adamw_transformers_of_the_same_size(baseline, stack):
    base, ref = load_spec(SPECS / baseline).spec, load_spec(SPECS / stack).spec
    assert (base.model.attention.type, base.model.memory.enabled, base.model.trm.enabled, base.optim.name) == \
        ("full", False, False, "adamw")
    n_base = count_parameters(build_model(base.model, base.objective, "meta"))["total"]
    n_ref = count_parameters(build_model(ref.model, ref.objective, "meta"))["total"]
    assert abs(n_base - n_ref) / n_ref < 0.005


def test_the_train_step_benchmarks_trainer_is_the_one_forge_train_builds():
    """bench_train_step.build_trainer (also bench_profile's, bench_memory's, bench_optimise's): a real step
    runs on it, with QK-clip wired as forge.train.components wires it."""
    from bench_train_step import build_trainer

    trainer = build_trainer(str(SPECS / "tiny.toml"), ["data.batch_size=2"])
    before = [p.detach().clone() for p in trainer.parts.model.parameters()]
    trainer.train_step(collect=False)
    after = list(trainer.parts.model.parameters())
    assert trainer.counters.step == 1 and all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(b, p) for b, p in zip(before, after))
    assert trainer.parts.qk_clip.spec == trainer.spec.optim.qk_clip and trainer.precision.name == "fp32"


def test_cli_benchmark_runs_and_writes_its_result():
    subprocess.run([sys.executable, "benchmarks/bench_cli.py", "--quick"], cwd=REPO, check=True,
                   capture_output=True, timeout=120)
    result = json.loads((REPO / "benchmarks" / "results" / "cli_quick.json").read_text())
    assert result["command"].endswith("benchmarks/bench_cli.py --quick")
    assert result["results"]["forge --help"]["exit_code"] == 0
    assert result["results"]["forge --help"]["median_s"] > 0
    # every result names the CPU's capability (bf16 is native on some CPUs of this kind, emulated on others)
    flags = result["cpu_flags"]
    assert flags["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert flags["mkldnn_bf16_supported"] == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert flags["cpu_capability"] in result["machine"]
