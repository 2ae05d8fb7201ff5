"""train.precision = "auto": bf16 only where the device computes it natively (torch's capability queries and
a measured bf16/fp32 matmul ratio, cached per machine), fp32 otherwise; the trainer autocasts what was resolved,
perf/mfu uses that precision's measured peak, forge check reports it and fails an explicit bf16 that the device
only emulates; environment.json and the start output record it. The capability query is patched to stand for
an AVX2-only CPU and for a native one; three tests run for real on whatever machine runs them (the resolution,
the checklist item for phase1 as shipped and with an explicit bf16, a step's matmul dtype) and assert the
outcome consistent with torch's queries and the measured ratio there."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import SPECS
from forge.checklist.checks.precision import precision_native
from forge.checklist.context import CheckContext
from forge.spec.load import load_spec
from forge.train import precision as prec
from forge.train.precision import MachinePeaks, resolve_precision

CPU = torch.device("cpu")
# the two machine kinds of this project (techniques.md section 7), as measured there
AVX2 = MachinePeaks(fp32_flops=102e9, bf16_flops=0.5e9, n=1024, measured_at="test")
NATIVE = MachinePeaks(fp32_flops=212e9, bf16_flops=830e9, n=1024, measured_at="test")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A fresh forge cache dir per test: the machine's peaks are measured (or patched) afresh."""
    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path / "cache"))


def machine(monkeypatch, native: bool) -> None:
    """Stand for an AVX2-only CPU (torch reports no native bf16; bf16 matmuls emulated, ~200x slower) or for a
    CPU with AVX-512 BF16 (native, ~4x faster)."""
    capability = "AVX512 +avx512_bf16" if native else "AVX2"
    monkeypatch.setattr(prec, "bf16_query", lambda device: (native, capability))
    monkeypatch.setattr(prec, "measure_peaks", lambda device: NATIVE if native else AVX2)


@pytest.mark.parametrize("native, expected", [(False, "fp32"), (True, "bf16")])
def test_auto_resolves_to_bf16_only_where_bf16_is_native(monkeypatch, native, expected):
    machine(monkeypatch, native)
    p = resolve_precision("auto", CPU)
    assert (p.name, p.dtype, p.bf16_native) == (expected, prec.DTYPES[expected], native)
    # MFU's peak: the measured peak of what runs
    assert p.peak_flops == (NATIVE.bf16_flops if native else AVX2.fp32_flops)
    assert p.record()["resolved"] == expected and p.record()["setting"] == "auto"
    assert p.describe().startswith(f"auto -> {expected}")


def test_the_measured_ratio_overrules_a_query_that_reports_native_bf16(monkeypatch):
    monkeypatch.setattr(prec, "bf16_query", lambda device: (True, "AVX512"))
    monkeypatch.setattr(prec, "measure_peaks", lambda device: AVX2)
    p = resolve_precision("auto", CPU)
    assert p.name == "fp32" and p.bf16_query and not p.bf16_native


def test_an_explicit_bf16_without_native_support_runs_against_the_fp32_peak(monkeypatch):
    """perf/mfu never divides by an emulation speed."""
    machine(monkeypatch, native=False)
    p = resolve_precision("bf16", CPU)
    assert p.name == "bf16" and not p.bf16_native and p.peak_flops == AVX2.fp32_flops


def test_resolution_on_this_machine_follows_torchs_own_queries():
    """For real: no patching. On the project's AVX-512 BF16 EPYC this resolves to bf16; on an AVX2-only CPU to
    fp32 (both are checked against torch's queries, whichever machine runs the suite)."""
    p = resolve_precision("auto", CPU)
    capability = torch.backends.cpu.get_cpu_capability()
    native_instructions = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    torch_native = bool(native_instructions) and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert p.capability.split()[0] == capability and p.bf16_query == torch_native
    assert p.peaks.fp32_flops > 0 and p.peaks.bf16_flops > 0
    assert p.name == ("bf16" if torch_native and p.peaks.bf16_speedup >= prec.MIN_BF16_SPEEDUP else "fp32")
    if not torch_native:        # emulated bf16 is far slower than fp32: auto must not pick it
        assert p.name == "fp32"
    print(f"this machine: {p.describe()}")


def test_the_precision_check_on_this_machine_reports_what_auto_uses_and_judges_an_explicit_bf16():
    """For real (no patching), the checklist item behind issue 18's two commands, on whatever CPU runs the
    suite: for specs/phase1.toml it names the precision auto resolves to here, and with train.precision = bf16
    it fails exactly where bf16 is not native, naming the measured slowdown (on an AVX2-only CPU: auto -> fp32,
    and a failure). The CLI wiring (CFG-precision, critical, exit 1) is the patched test above."""
    from forge.train.components import resolve_device

    spec = load_spec(SPECS / "phase1.toml")
    real = resolve_precision("auto", resolve_device(spec.spec.train.device))   # the device the check resolves
    auto = precision_native(CheckContext(spec))
    where = f"({real.device} {real.capability}"
    assert auto.status == "pass" and auto.measured.startswith(f"auto -> {real.name} {where}")
    assert real.name == ("bf16" if real.bf16_native else "fp32")
    bf16 = precision_native(CheckContext(load_spec(SPECS / "phase1.toml", ["train.precision=bf16"])))
    if real.bf16_native:
        assert bf16.status == "pass" and bf16.measured.startswith(f"bf16 {where}")
    else:
        slowdown = 1 / real.peaks.bf16_speedup
        assert bf16.status == "fail" and f"bf16 matmuls run {slowdown:.1f}x slower than fp32 here" in bf16.detail
        assert slowdown > 1 and 'train.precision = "auto"' in bf16.detail
    print(f"this machine: {auto.measured}; explicit bf16: {bf16.status}: {bf16.detail}")


def test_the_peaks_are_measured_once_per_machine_and_cached(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(prec, "measure_peaks", lambda device: calls.append(1) or NATIVE)
    first = resolve_precision("auto", CPU)
    prec._MEMO.clear()                                    # a new process: only the file remains
    second = resolve_precision("fp32", CPU)
    assert calls == [1] and first.peaks == second.peaks
    (path,) = (tmp_path / "cache" / "machine").iterdir()
    saved = json.loads(path.read_text())
    assert saved["peaks"]["bf16_flops"] == NATIVE.bf16_flops and saved["key"]["threads"] == torch.get_num_threads()
    # a training run (in a new process) measures again, once, and the cache keeps the best of each peak
    prec._MEMO.clear(), prec._REFRESHED.clear()
    monkeypatch.setattr(prec, "measure_peaks", lambda device: calls.append(2) or MachinePeaks(300e9, 500e9, 1024, "t"))
    for _ in range(2):
        refreshed = resolve_precision("auto", CPU, refresh=True).peaks
    assert calls == [1, 2] and (refreshed.fp32_flops, refreshed.bf16_flops) == (300e9, NATIVE.bf16_flops)
    assert json.loads(path.read_text())["peaks"]["fp32_flops"] == 300e9


def test_the_real_measurement_recognises_emulated_bf16_quickly(monkeypatch):
    """measure_peaks on a device whose bf16 is ~200x slower measures bf16 on the small probe only."""
    from forge.train import perf

    sizes = []

    def fake(device, n=1024, repeats=5, dtype=torch.float32):
        sizes.append((n, dtype))
        return 100e9 if dtype == torch.float32 else 0.5e9

    monkeypatch.setattr(perf, "matmul_peak_flops", fake)
    peaks = prec.measure_peaks(CPU)
    assert peaks.bf16_speedup == pytest.approx(0.005)
    assert all(n == 256 for n, dtype in sizes if dtype == torch.bfloat16)


def matmul_dtypes_of_a_step(tmp_path) -> tuple[set[torch.dtype], object]:
    """The dtypes one FFN matmul's output takes during a train_step of tiny at train.precision = auto."""
    from forge.train.components import build_components
    from forge.train.loop import Trainer

    resolved = load_spec(SPECS / "tiny.toml", ["train.precision=auto", "logging.wandb.mode=disabled"])
    parts = build_components(resolved.spec, tmp_path)
    trainer = Trainer(resolved, None, parts, None, None, None)
    seen = set()
    parts.model.blocks[0].ffn.down_proj.register_forward_hook(lambda m, a, out: seen.add(out.dtype))
    trainer.train_step(collect=False)
    return seen, trainer


@pytest.mark.parametrize("native", [False, True])
def test_the_trainer_autocasts_what_auto_resolved(monkeypatch, tmp_path, native):
    """On a CPU without native bf16 the step's matmuls run in fp32 (fp32 speed), with it in bf16."""
    machine(monkeypatch, native)
    seen, trainer = matmul_dtypes_of_a_step(tmp_path)
    assert seen == {torch.bfloat16 if native else torch.float32}
    assert trainer.precision.peak_flops == (NATIVE.bf16_flops if native else AVX2.fp32_flops)


def test_the_step_on_this_machine_computes_in_what_auto_resolved(tmp_path):
    """For real: a step's matmuls run in bf16 only where bf16 is native here (an AVX2-only CPU: fp32, so the
    step runs at fp32 speed, never at bf16 emulation speed)."""
    seen, trainer = matmul_dtypes_of_a_step(tmp_path)
    assert seen == {torch.bfloat16 if trainer.precision.bf16_native else torch.float32}
    assert trainer.precision.peak_flops == (trainer.precision.peaks.bf16_flops if trainer.precision.bf16_native
                                            else trainer.precision.peaks.fp32_flops)


def test_forge_check_fails_an_explicit_bf16_without_native_support(monkeypatch, run_cli, tmp_path):
    machine(monkeypatch, native=False)
    code, out, _ = run_cli("check", str(SPECS / "tiny.toml"), "--set", "train.precision=bf16", "--json")
    report = json.loads(out)
    item = next(i for i in report["items"] if i["id"] == "CFG-precision")
    assert code == 1 and item["status"] == "fail" and item["severity"] == "critical"
    assert "204.0x slower than fp32" in item["detail"]          # 102 / 0.5 GFLOP/s, measured
    assert 'train.precision = "auto"' in item["detail"] and '"fp32"' in item["detail"]
    # the same spec as shipped (fp32) passes; phase1 (auto) reports the precision it will use
    assert precision_native(CheckContext(load_spec(SPECS / "tiny.toml"))).status == "pass"
    phase1 = precision_native(CheckContext(load_spec(SPECS / "phase1.toml")))
    assert phase1.status == "pass" and phase1.measured.startswith("auto -> fp32 (cpu AVX2: no native bf16")


def test_forge_check_passes_bf16_where_it_is_native(monkeypatch):
    machine(monkeypatch, native=True)
    ctx = CheckContext(load_spec(SPECS / "phase1.toml", ["train.precision=bf16"]))
    assert precision_native(ctx).status == "pass"
    assert precision_native(CheckContext(load_spec(SPECS / "phase1.toml"))).measured.startswith("auto -> bf16")
    fp32 = precision_native(CheckContext(load_spec(SPECS / "tiny.toml")))
    assert fp32.status == "pass" and 'train.precision = "auto" would use it' in fp32.detail


def test_the_run_records_and_shows_its_precision(monkeypatch, run_cli, tmp_path):
    machine(monkeypatch, native=False)
    fast = ["train.precision=auto", "train.eval_every=2", "logging.every=2", "checkpoint.every=2",
            "data.eval.max_batches=1", "logging.wandb.mode=disabled", "probes.enabled=false"]
    code, out, err = run_cli("train", str(SPECS / "tiny.toml"), "--force", "--max-steps", "2", "--run-id", "p",
                             *[x for a in fast for x in ("--set", a)], cwd=tmp_path)
    assert code == 0, err
    assert "precision: auto -> fp32 (cpu AVX2: no native bf16, bf16 matmul 204x slower than fp32)" in out
    env = json.loads((tmp_path / "runs" / "p" / "environment.json").read_text())
    env = env[-1] if isinstance(env, list) else env          # one record per launch, or the single record
    assert env["precision"]["setting"] == "auto" and env["precision"]["resolved"] == "fp32"
    assert env["precision"]["bf16_native"] is False and env["precision"]["bf16_speedup"] == pytest.approx(0.0049, abs=1e-4)
    from forge.model.flops import model_flops_per_token

    last = [json.loads(line) for line in (tmp_path / "runs" / "p" / "metrics.jsonl").read_text().splitlines()][-1]
    spec = load_spec(SPECS / "tiny.toml").spec
    flops = model_flops_per_token(spec.model, spec.data.seq_len)["total"]
    # MFU against the fp32 peak, what the run's matmuls actually use
    assert last["perf/mfu"] == pytest.approx(last["perf/tokens_per_sec"] * flops / AVX2.fp32_flops)


@pytest.mark.parametrize("setting, native, ns", [("auto", True, "bf16"), ("auto", False, "fp32"), ("fp32", True, "fp32")])
def test_newton_schulz_runs_in_the_precision_of_the_step(monkeypatch, tmp_path, setting, native, ns):
    """optim.muon.ns_dtype = "auto" (phase1's): bf16 Newton-Schulz exactly when the step runs in native bf16."""
    from forge.train.components import build_components

    machine(monkeypatch, native)
    spec = load_spec(SPECS / "tiny.toml", [f"train.precision={setting}", "optim.muon.ns_dtype=auto"]).spec
    parts = build_components(spec, tmp_path)
    assert {g["ns_dtype"] for g in parts.optimizer.muon.param_groups} == {ns}
    assert parts.precision.name == ("bf16" if setting == "auto" and native else "fp32")
