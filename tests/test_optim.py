"""MuonGrokfast as the trainer sees it: routing (G2), Grokfast (D1), step order, applied lr schedule,
state round-trip, the AdamW baseline, the spec's D1/D2 mitigations, and a real LM task.

Models here are small real modules (an embedding tied to the LM head, LayerNorm gains and biases,
hidden Linear matrices, a scalar), and the real Phase 1 model on the meta device."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SPECS, shared_data_dir
from forge.errors import ForgeError
from forge.optim import build_lr_schedule, build_optimizer, lr_factor
from forge.optim.audit import audit_routing
from forge.optim.muon import update_scale
from forge.optim.newton_schulz import newton_schulz
from forge.spec.load import load_spec
from forge.spec.optim import OptimSpec

CTX, VOCAB, D = 4, 256, 32
NO_CLIP = "optim.grad_clip=1e9"


class TinyLM(nn.Module):
    """Byte-level next-token model: CTX bytes -> MLP -> logits through the tied embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.norm = nn.LayerNorm(D * CTX)
        self.up = nn.Linear(D * CTX, 4 * D)
        self.down = nn.Linear(4 * D, D, bias=False)
        self.out_norm = nn.LayerNorm(D)
        self.logit_scale = nn.Parameter(torch.tensor(D ** -0.5))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.down(F.gelu(self.up(self.norm(self.emb(idx).flatten(1)))))
        return self.out_norm(h) @ self.emb.weight.T * self.logit_scale


def optim_spec(*overrides: str) -> OptimSpec:
    return load_spec(SPECS / "tiny.toml", list(overrides)).spec.optim


def with_overrides(spec: OptimSpec, **fields) -> OptimSpec:
    return OptimSpec.model_validate({**spec.model_dump(), **fields})


def corpus() -> torch.Tensor:
    """Real text as bytes: the TinyStories sample, else (no shared data) this Python's own json module."""
    root = shared_data_dir()
    if root is not None:
        lines = (root / "tinystories" / "train_sample.jsonl").read_text().splitlines()[:200]
        text = "\n".join(json.loads(line)["text"] for line in lines)
    else:
        text = Path(json.__file__).with_name("decoder.py").read_text() * 4
    return torch.tensor(list(text.encode()), dtype=torch.long)


def batch(data: torch.Tensor, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - CTX - 1, (size,), generator=generator)
    return torch.stack([data[s:s + CTX] for s in starts]), data[starts + CTX]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return corpus()


# ------------------------------------------------------------------------------------------ routing (G2)

def test_every_parameter_in_exactly_one_group_with_the_spec_settings():
    spec = optim_spec("optim.adamw.weight_decay=0.01", "optim.weight_decay=0.07")
    model = TinyLM()
    opt = build_optimizer(spec, model)
    owners = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(owners) == sorted(id(p) for p in model.parameters()) and len(owners) == len(set(owners))
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    assert muon == {id(model.up.weight), id(model.down.weight)}
    for g in opt.adamw.param_groups:
        assert g["weight_decay"] == 0.01 and g["betas"] == tuple(spec.adamw.betas) and g["eps"] == spec.adamw.eps
        assert all(p.ndim != 2 or p is model.emb.weight for p in g["params"])
    assert all(g["weight_decay"] == 0.07 for g in opt.muon.param_groups)
    assert isinstance(opt.adamw, torch.optim.AdamW) and opt.grokfast is not None
    assert audit_routing(spec, model, VOCAB)[0] == []


def test_audit_catches_an_untied_vocab_head_in_muon():
    model = TinyLM()
    model.head = nn.Linear(D, VOCAB, bias=False)  # untied LM head: 2-D, not an nn.Embedding
    problems, table = audit_routing(optim_spec(), model, VOCAB)
    assert len(problems) == 1 and "head.weight" in problems[0] and "expected adamw" in problems[0]
    assert table["muon"]["tensors"] == 3


def test_routing_on_the_real_model():
    from forge.model import build_model

    spec = load_spec(SPECS / "phase1.toml").spec
    model = build_model(spec.model, spec.objective, device="meta")
    problems, table = audit_routing(spec.optim, model, spec.model.vocab_size)
    assert problems == []
    assert table["muon"]["elements"] + table["adamw"]["elements"] == sum(p.numel() for p in model.parameters())


def test_optim_routing_check_reports_group_counts():
    from forge.checklist.context import CheckContext
    from forge.checklist.registry import lookup

    outcome = lookup("optim_routing")(CheckContext(load_spec(SPECS / "tiny.toml")))
    assert outcome.status == "pass", outcome.detail
    assert set(outcome.data) == {"muon", "adamw"} and outcome.data["muon"]["optimizer"] == "muon"
    assert f"{outcome.data['muon']['tensors']} tensors" in outcome.measured


def test_lr_overrides_split_groups_and_apply_their_lr(data):
    spec = with_overrides(optim_spec("optim.name=adamw", "optim.weight_decay=0.0", NO_CLIP),
                          lr_overrides=[{"match": "up.", "scale": 0.5}])
    model = TinyLM()
    opt = build_optimizer(spec, model)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"adamw_matrices", "adamw_matrices:up.", "adamw", "adamw:up."}
    assert groups["adamw:up."]["params"] == [model.up.bias]
    before = model.up.weight.detach().clone(), model.down.weight.detach().clone()
    loss_of(model, *batch(data, 64, torch.Generator().manual_seed(0))).backward()
    opt.step()
    # Adam's first step moves every weight by lr * g / (|g| + eps): exactly the applied lr where g != 0
    up_step = (model.up.weight.detach() - before[0]).abs().max().item()
    down_step = (model.down.weight.detach() - before[1]).abs().max().item()
    assert up_step == pytest.approx(0.5 * spec.lr, rel=1e-3) and down_step == pytest.approx(spec.lr, rel=1e-3)


@pytest.mark.parametrize("overrides, message", [
    ([{"match": "nowhere", "scale": 0.5}], "matches no trainable parameter"),
    ([{"match": "up", "scale": 0.5}, {"match": "up.w", "scale": 2.0}], "matches several lr overrides"),
])
def test_bad_lr_overrides_are_spec_errors(overrides, message):
    with pytest.raises(ForgeError, match=message) as err:
        build_optimizer(with_overrides(optim_spec(), lr_overrides=overrides), TinyLM())
    assert "optim.lr_overrides[" in str(err.value)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_newton_schulz_is_refused_where_bf16_is_not_native(monkeypatch, tmp_path, native):
    """Emulated bf16 (an AVX2-only CPU, the capability query patched) is over 100x slower: refused; native: built."""
    from forge.train import precision as prec

    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(prec, "bf16_query", lambda device: (native, "AVX512 +avx512_bf16" if native else "AVX2"))
    monkeypatch.setattr(prec, "measure_peaks", lambda device: prec.MachinePeaks(100e9, 400e9 if native else 0.5e9,
                                                                                 1024, "test"))
    if native:
        opt = build_optimizer(optim_spec("optim.muon.ns_dtype=bf16"), TinyLM())
        assert {g["ns_dtype"] for g in opt.muon.param_groups} == {"bf16"}
    else:
        with pytest.raises(ForgeError, match='ns_dtype = "auto"'):
            build_optimizer(optim_spec("optim.muon.ns_dtype=bf16"), TinyLM())


# ------------------------------------------------------------------------------------------ Grokfast (D1)

def grokfast_opt(alpha: float, lam: float):
    param = nn.Parameter(torch.zeros(5))
    model = nn.Module()
    model.p = param
    spec = optim_spec(NO_CLIP, f"optim.grokfast.alpha={alpha}", f"optim.grokfast.lam={lam}")
    return param, build_optimizer(spec, model)


def filtered(param, opt, grad: torch.Tensor) -> torch.Tensor:
    """The gradient the update used: step() leaves the filtered (and clipped) gradient in p.grad."""
    param.grad = grad.clone()
    opt.step()
    return param.grad.clone()


def test_lam_zero_is_the_identity():
    param, opt = grokfast_opt(0.98, 0.0)
    for seed in range(4):
        g = torch.randn(5, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(filtered(param, opt, g), g)


def test_alpha_zero_gives_one_plus_lam_times_g():
    param, opt = grokfast_opt(0.0, 0.3)
    for seed in range(4):
        g = torch.randn(5, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(filtered(param, opt, g), 1.3 * g)


def test_constant_gradient_gives_one_plus_lam_times_g_every_step():
    param, opt = grokfast_opt(0.98, 0.3)
    g = torch.randn(5)
    for _ in range(5):
        torch.testing.assert_close(filtered(param, opt, g), 1.3 * g)


def test_ema_follows_the_recurrence():
    param, opt = grokfast_opt(0.9, 2.0)
    gs = [torch.randn(5, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    ema = gs[0]
    for i, g in enumerate(gs):
        ema = g if i == 0 else 0.9 * ema + 0.1 * g
        torch.testing.assert_close(filtered(param, opt, g), g + 2.0 * ema)


def test_grokfast_runs_once_per_optimizer_step_under_gradient_accumulation(data):
    """Two micro-batches, one step: the EMA starts at the accumulated gradient, not at either half."""
    model = TinyLM()
    opt = build_optimizer(optim_spec(NO_CLIP), model)
    gen = torch.Generator().manual_seed(0)
    accumulated = []
    for _ in range(2):
        for _ in range(2):  # grad_accum = 2
            (loss_of(model, *batch(data, 32, gen)) / 2).backward()
        accumulated.append(model.up.weight.grad.clone())
        opt.step()
        if len(accumulated) == 1:
            torch.testing.assert_close(opt.grokfast.ema[opt.params.index(model.up.weight)], accumulated[0])
        opt.zero_grad(set_to_none=True)
    ema = 0.98 * accumulated[0] + 0.02 * accumulated[1]
    torch.testing.assert_close(opt.grokfast.ema[opt.params.index(model.up.weight)], ema)


# ------------------------------------------------------------------------------------------ step order

def test_step_order_grokfast_then_clip_then_update(data):
    model = TinyLM()
    opt = build_optimizer(optim_spec("optim.grad_clip=0.05"), model)
    loss_of(model, *batch(data, 64, torch.Generator().manual_seed(0))).backward()
    raw = [p.grad.clone() for p in opt.params]
    raw_norm = torch.nn.utils.get_total_norm(raw)
    assert opt.step(collect_metrics=True)
    grad_norm = opt.metrics()["optim/grad_norm"]
    # first step: Grokfast gives (1 + lam) g, clipping then scales the whole gradient to norm 0.05
    torch.testing.assert_close(grad_norm, 1.3 * raw_norm)
    after = torch.nn.utils.get_total_norm([p.grad for p in opt.params])
    assert after.item() == pytest.approx(0.05, rel=1e-4)
    for p, g in zip(opt.params, raw):
        torch.testing.assert_close(p.grad, 1.3 * g * (0.05 / grad_norm), rtol=1e-4, atol=1e-8)
    m = opt.metrics()
    torch.testing.assert_close(m["optim/grad_raw_norm"], raw_norm)
    torch.testing.assert_close(m["optim/grokfast_ema_norm"], raw_norm)          # EMA = first gradient
    torch.testing.assert_close(m["optim/grad_ema_ratio"], torch.tensor(1.3))  # (1 + lam) g over g
    assert 0 < m["optim/ortho_error"] and 0 < m["optim/effective_rank"] <= 1


def test_metrics_are_cheap_unless_asked(data):
    model = TinyLM()
    opt = build_optimizer(optim_spec(), model)
    loss_of(model, *batch(data, 32, torch.Generator().manual_seed(0))).backward()
    opt.step()
    assert set(opt.metrics()) == {"optim/grad_raw_norm", "optim/grad_norm", "optim/lr_muon", "optim/lr_adamw"}


def test_non_finite_gradient_skips_the_whole_step(data):
    model = TinyLM()
    opt = build_optimizer(optim_spec(), model)
    gen = torch.Generator().manual_seed(0)
    loss_of(model, *batch(data, 32, gen)).backward()
    opt.step()
    opt.zero_grad()
    weights = [p.detach().clone() for p in opt.params]
    ema = [e.clone() for e in opt.grokfast.ema]
    momentum = opt.muon.state[model.up.weight]["momentum_buffer"].clone()
    loss_of(model, *batch(data, 32, gen)).backward()
    model.up.weight.grad[0, 0] = float("nan")
    assert not opt.step()
    assert all(torch.equal(w, p) for w, p in zip(weights, opt.params))
    assert all(torch.equal(a, b) for a, b in zip(ema, opt.grokfast.ema))
    assert torch.equal(momentum, opt.muon.state[model.up.weight]["momentum_buffer"])
    assert opt.skipped_steps == 1 and opt.steps == 1


def _everything(opt) -> list[torch.Tensor]:
    """Weights, every inner optimizer state tensor and the Grokfast EMA, copied."""
    tensors = [p.detach().clone() for p in opt.params]
    for inner in opt.inner:
        tensors += [v.clone() for st in inner.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return tensors + [e.clone() for e in opt.grokfast.ema if e is not None]


@pytest.mark.parametrize("poison", ["lr_inf", "lam_1e38"])
def test_non_finite_update_or_filtered_gradient_is_undone_and_counted(data, poison):
    """Issue 14: a finite raw gradient can still give non-finite weights (lr = inf) or a non-finite filtered
    gradient (lam = 1e38): the step is undone whole (weights, momenta, moments, EMA) and counted as skipped."""
    model = TinyLM()
    opt = build_optimizer(optim_spec(), model)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        loss_of(model, *batch(data, 32, gen)).backward()
        assert opt.step()
        opt.zero_grad()
    before = _everything(opt)
    if poison == "lr_inf":
        for group in opt.param_groups:
            group["lr"] = float("inf")
    else:
        opt.grokfast.lam = 1e38
    loss_of(model, *batch(data, 32, gen)).backward()
    assert not opt.step(collect_metrics=True)
    assert all(torch.equal(a, b) for a, b in zip(before, _everything(opt)))
    assert opt.skipped_steps == 1 and opt.steps == 2 and opt.metrics()["optim/skipped_steps"] == 1
    # what is logged is finite (no null ratio for diagnose to misread); an overflowed filter logs no ratio
    assert all(math.isfinite(float(v)) for v in opt.metrics().values())
    assert (poison == "lam_1e38") == ("optim/grad_ema_ratio" not in opt.metrics())


def test_first_step_undone_leaves_no_optimizer_state(data):
    model = TinyLM()
    opt = build_optimizer(optim_spec(), model)
    for group in opt.param_groups:
        group["lr"] = float("inf")
    loss_of(model, *batch(data, 32, torch.Generator().manual_seed(0))).backward()
    weights = [p.detach().clone() for p in opt.params]
    assert not opt.step()
    assert all(torch.equal(w, p) for w, p in zip(weights, opt.params))
    assert not any(inner.state for inner in opt.inner) and all(e is None for e in opt.grokfast.ema)


# ------------------------------------------------------------------------------------------ lr schedule

def expected_factor(step: int, warmup: int, total: int, kind: str, floor: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / (total - warmup)
    shape = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[kind]
    return 1.0 if kind == "constant" else floor + (1 - floor) * shape


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_applied_lr_follows_the_schedule(kind):
    """Measure the lr each step really applies: Muon (exact SVD) moves W by RMS 0.2 lr; AdamW with a
    constant gradient moves each weight by exactly lr."""
    train = load_spec(SPECS / "tiny.toml", [f"train.lr_schedule={kind}", "train.max_steps=12",
                                             "train.warmup_steps=3", "train.min_lr_ratio=0.1"]).spec.train
    spec = optim_spec("optim.muon.use_svd=true", "optim.weight_decay=0.0", "optim.adamw.lr=0.02")
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(8, 16))
    model.b = nn.Parameter(torch.zeros(16))
    opt = build_optimizer(spec, model)
    schedule = build_lr_schedule(train, opt)
    gen = torch.Generator().manual_seed(0)
    for step in range(train.max_steps):
        before = model.w.detach().clone(), model.b.detach().clone()
        model.w.grad = 1e-3 * torch.randn(8, 16, generator=gen)
        model.b.grad = torch.full((16,), 1e-3)
        opt.step()
        schedule.step()
        muon_lr = (model.w.detach() - before[0]).pow(2).mean().sqrt().item() / 0.2
        adamw_lr = (model.b.detach() - before[1]).abs().mean().item()
        factor = expected_factor(step, 3, 12, kind, 0.1)
        assert muon_lr == pytest.approx(spec.lr * factor, rel=1e-4), step
        assert adamw_lr == pytest.approx(0.02 * factor, rel=1e-4), step
        assert opt.metrics()["optim/lr_muon"] == pytest.approx(spec.lr * factor)


def test_schedule_state_round_trips():
    train = load_spec(SPECS / "tiny.toml").spec.train
    opt = build_optimizer(optim_spec(), TinyLM())
    schedule = build_lr_schedule(train, opt)
    for _ in range(37):
        schedule.step()
    other = build_optimizer(optim_spec(), TinyLM())
    resumed = build_lr_schedule(train, other)
    resumed.load_state_dict(schedule.state_dict())
    assert [g["lr"] for g in other.param_groups] == [g["lr"] for g in opt.param_groups]
    assert opt.param_groups[0]["lr"] == pytest.approx(optim_spec().lr * lr_factor(37, train))


# ------------------------------------------------------------------------------------------ state (F2)

@pytest.mark.parametrize("name", ["muon_grokfast", "adamw"])
def test_state_dict_round_trips_through_weights_only_load(name, data):
    spec = optim_spec(f"optim.name={name}")
    torch.manual_seed(0)
    model = TinyLM()
    opt = build_optimizer(spec, model)
    gen = torch.Generator().manual_seed(0)
    batches = [batch(data, 32, gen) for _ in range(4)]
    for x, y in batches[:3]:
        loss_of(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    clone = TinyLM()
    clone.load_state_dict(saved["model"])
    resumed = build_optimizer(spec, clone)
    resumed.load_state_dict(saved["optim"])
    assert resumed.steps == 3
    for m, o in ((model, opt), (clone, resumed)):
        loss_of(m, *batches[3]).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), clone.parameters()))
    if name == "muon_grokfast":
        assert all(torch.equal(a, b) for a, b in zip(opt.grokfast.ema, resumed.grokfast.ema))


def test_loading_state_of_another_optimizer_is_a_forge_error():
    saved = build_optimizer(optim_spec("optim.name=adamw"), TinyLM()).state_dict()
    with pytest.raises(ForgeError, match="muon"):
        build_optimizer(optim_spec(), TinyLM()).load_state_dict(saved)


# ------------------------------------------------------------------------------------------ baseline, mitigations

def test_adamw_baseline_is_torch_adamw_with_the_spec_settings(data):
    spec = optim_spec("optim.name=adamw", NO_CLIP)
    torch.manual_seed(0)
    model = TinyLM()
    reference = TinyLM()
    reference.load_state_dict(model.state_dict())
    opt = build_optimizer(spec, model)
    assert opt.muon is None and opt.grokfast is None
    matrices = [reference.up.weight, reference.down.weight]
    rest = [p for p in reference.parameters() if all(p is not m for m in matrices)]
    torch_opt = torch.optim.AdamW([{"params": matrices, "weight_decay": spec.weight_decay},
                                   {"params": rest, "weight_decay": spec.adamw.weight_decay}],
                                  lr=spec.lr, betas=tuple(spec.adamw.betas), eps=spec.adamw.eps)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = batch(data, 32, gen)
        for m, o in ((model, opt), (reference, torch_opt)):
            loss_of(m, x, y).backward()
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("lam", [0.3, 0.1])
def test_d1_mitigation_lam_from_the_spec_is_applied(lam, data):
    model = TinyLM()
    opt = build_optimizer(optim_spec(NO_CLIP, f"optim.grokfast.lam={lam}"), model)
    loss_of(model, *batch(data, 32, torch.Generator().manual_seed(0))).backward()
    raw = model.down.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model.down.weight.grad, (1 + lam) * raw)


@pytest.mark.parametrize("k", [3, 5])
def test_d2_mitigation_ns_steps_from_the_spec_is_applied(k, data):
    spec = optim_spec(f"optim.muon.ns_steps={k}")
    model = TinyLM()
    opt = build_optimizer(spec, model)
    loss_of(model, *batch(data, 32, torch.Generator().manual_seed(0))).backward()
    g = model.down.weight.grad.clone()   # first step: u = (1 - beta^2) (1 + lam) clip g, NS is scale-invariant
    before = model.down.weight.detach().clone()
    opt.step()
    decayed = before * (1 - spec.lr * spec.weight_decay)
    scale = spec.lr * update_scale(*g.shape, spec.muon.scaling)
    delta = model.down.weight.detach() - decayed
    torch.testing.assert_close(delta, -scale * newton_schulz(g, k), atol=1e-7, rtol=1e-4)
    other = 8 - k
    assert (delta + scale * newton_schulz(g, other)).abs().max() > 1e-6


@pytest.mark.parametrize("name, lr", [("muon_grokfast", 1e-2), ("adamw", 1e-2)])
def test_training_reduces_the_loss_on_real_text(name, lr, data):
    train = load_spec(SPECS / "tiny.toml", ["train.max_steps=60", "train.warmup_steps=5"]).spec.train
    torch.manual_seed(0)
    model = TinyLM()
    opt = build_optimizer(optim_spec(f"optim.name={name}", f"optim.lr={lr}"), model)
    schedule = build_lr_schedule(train, opt)
    gen = torch.Generator().manual_seed(0)
    eval_x, eval_y = batch(data, 1024, torch.Generator().manual_seed(99))
    with torch.no_grad():
        initial = loss_of(model, eval_x, eval_y).item()
    for _ in range(train.max_steps):
        loss_of(model, *batch(data, 128, gen)).backward()
        opt.step()
        schedule.step()
        opt.zero_grad()
    with torch.no_grad():
        final = loss_of(model, eval_x, eval_y).item()
    assert final < initial - 1.5, (initial, final)
