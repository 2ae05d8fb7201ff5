"""Run directory, lock, atomic checkpoints, metrics stream, monitors, merge: the parts of forge train
that hold a run's record. (End-to-end training runs are in test_train.py.)"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from forge.errors import ForgeError
from forge.train import checkpoint as ckpt
from forge.train.merge import merge_state_dicts, slerp
from forge.train.metrics_log import read_metrics, truncate_after
from forge.train.monitors import Monitor, MonitorSet, evaluate, load_monitors
from forge.train.run_dir import RunDir, RunLocked, new_run_id


class Tied(nn.Module):
    """Embedding tied to the output head, like the real model."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.body = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("ema", torch.zeros(3))

    def forward(self, idx):
        return self.head(self.body(self.emb(idx)))


def test_run_ids_are_readable_and_unique():
    ids = {new_run_id("tiny") for _ in range(50)}
    assert len(ids) == 50 and all(i.startswith("tiny-") for i in ids)


def test_lock_prevents_a_second_writer(tmp_path):
    run = RunDir.create(tmp_path, "r1")
    run.lock()
    other = RunDir(run.path)
    with pytest.raises(RunLocked):
        other.lock()
    run.unlock()
    other.lock()  # free again once released
    other.unlock()


def _hold_lock(path: str, ready) -> None:
    run = RunDir(Path(path))
    run.lock()
    ready.set()
    time.sleep(60)
    run.unlock()


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    run = RunDir.create(tmp_path, "r1")
    ready = mp.Event()
    proc = mp.get_context("fork").Process(target=_hold_lock, args=(str(run.path), ready))
    proc.start()
    assert ready.wait(10)
    with pytest.raises(RunLocked):
        RunDir(run.path).lock()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    RunDir(run.path).lock()


def test_status_records_and_existing_dir_refused(tmp_path):
    run = RunDir.create(tmp_path, "r1")
    run.set_status("running", step=0)
    run.set_status("failed", error="boom")
    assert run.status()["status"] == "failed" and run.status()["error"] == "boom"
    with pytest.raises(ForgeError, match="already exists"):
        RunDir.create(tmp_path, "r1")
    with pytest.raises(ForgeError, match="no run 'zz'"):
        RunDir.open(tmp_path, "zz")


def test_checkpoint_round_trip_with_tied_weights(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    model.ema += torch.tensor([1.0, 2.0, 3.0])
    state = {"step": 7, "rng": torch.get_rng_state(), "opt": {"m": torch.randn(3)}, "names": ["a", "b"]}
    path = ckpt.save_checkpoint(tmp_path, 7, model, state, {"run_id": "r"})
    fresh = Tied()
    loaded, meta = ckpt.load_checkpoint(path, fresh)
    idx = torch.arange(11)
    assert torch.equal(fresh(idx), model(idx))                      # logits bit for bit
    assert fresh.head.weight is fresh.emb.weight                    # still one Parameter
    assert torch.equal(fresh.ema, model.ema)
    assert torch.equal(loaded["opt"]["m"], state["opt"]["m"]) and loaded["names"] == ["a", "b"]
    assert meta["step"] == 7 and meta["run_id"] == "r"


def test_corrupted_or_partial_checkpoint_is_ignored(tmp_path):
    model = Tied()
    first = ckpt.save_checkpoint(tmp_path, 1, model, {"s": 1}, {})
    second = ckpt.save_checkpoint(tmp_path, 2, model, {"s": 2}, {})
    assert ckpt.latest_valid(tmp_path) == second
    with open(second / "model.safetensors", "r+b") as f:  # flip bytes in the newest
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.warns(UserWarning, match="does not match its checksum"):
        assert ckpt.latest_valid(tmp_path) == first
    (first / "manifest.json").unlink()                      # an interrupted write has no manifest
    with pytest.warns(UserWarning):
        assert ckpt.latest_valid(tmp_path) is None
    with pytest.raises(ForgeError, match="not loadable"):
        ckpt.load_checkpoint(first, model)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, Tied(), {}, {})
    with pytest.raises(ForgeError, match="does not fit"):
        ckpt.load_checkpoint(path, nn.Linear(3, 3))


def test_state_with_code_is_refused_by_the_loader(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, Tied(), {"ok": 1}, {})
    # replace state.pt by a pickle that would run code, then fix up the manifest so only the
    # weights_only loader stands between it and execution
    torch.save({"evil": os.system}, path / "state.pt")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["state.pt"] = {"sha256": ckpt._sha256(path / "state.pt"),
                                     "bytes": (path / "state.pt").stat().st_size}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ForgeError, match="cannot be loaded safely"):
        ckpt.load_checkpoint(path, Tied())


def _write_forever(root: str) -> None:
    model = nn.Linear(512, 512)
    step = 2
    while True:
        ckpt.save_checkpoint(Path(root), step, model, {"s": step}, {})
        step += 1


def test_kill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, nn.Linear(512, 512), {"s": 1}, {})
    proc = mp.get_context("fork").Process(target=_write_forever, args=(str(tmp_path),))
    proc.start()
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    latest = ckpt.latest_valid(tmp_path)
    assert latest is not None
    state, meta = ckpt.load_checkpoint(latest, nn.Linear(512, 512))
    assert state["s"] == meta["step"] >= 1
    ckpt.prune(tmp_path, keep_last_n=2)
    assert len(ckpt.list_checkpoints(tmp_path)) <= 2 and not list(tmp_path.glob(".tmp-*"))


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, Tied(), {}, {})
    ckpt.prune(tmp_path, 2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-0000003", "step-0000004"]


def test_metrics_reader_tolerates_a_torn_line_and_truncates(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a"')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    truncate_after(path, 1)
    assert read_metrics(path) == [{"step": 1, "a": 1.0}]


# ------------------------------------------------------------------------------------------ monitors

def _history(metric, values, start=10, every=10):
    return [{"step": start + i * every, metric: v} for i, v in enumerate(values)]


def test_range_monitor_uses_the_window_mean():
    m = Monitor(id="C1-x", title="t", kind="range", metric="gate/entropy", min=0.5, window=3)
    assert evaluate(m, _history("gate/entropy", [0.9, 0.2])) is None            # not enough data
    assert evaluate(m, _history("gate/entropy", [0.9, 0.9, 0.2])) is None       # one low value: mean ok
    assert "mean 0.3" in evaluate(m, _history("gate/entropy", [0.3, 0.3, 0.3]))


def test_decreasing_spike_and_ordered_monitors():
    dec = Monitor(id="A1-x", title="t", kind="decreasing", metric="loss/total", window=4)
    assert evaluate(dec, _history("loss/total", [5, 4, 4.2, 3])) is None
    assert "trend" in evaluate(dec, _history("loss/total", [3, 3.5, 3.2, 4]))
    spike = Monitor(id="B2-x", title="t", kind="no_spike", metric="loss/total", window=5, z=4)
    assert evaluate(spike, _history("loss/total", [3.0, 3.1, 2.9, 3.0, 3.05])) is None
    assert "zlast" in evaluate(spike, _history("loss/total", [3.0, 3.1, 2.9, 3.0, 9.0]))
    ordered = Monitor(id="C2-x", title="t", kind="ordered", metrics=["a", "b"], window=2)
    good = [{"step": s, "a": 2.0, "b": 1.0} for s in (1, 2)]
    bad = [{"step": s, "a": 1.0, "b": 1.5} for s in (1, 2)]
    assert evaluate(ordered, good) is None and "not decreasing" in evaluate(ordered, bad)


def test_monitor_set_reports_once_per_episode_and_after_step():
    m = Monitor(id="C1-x", title="t", kind="range", metric="act/avg_steps", min=1.5, window=2, after_step=30)
    ms = MonitorSet([m])
    fired = [w.step for r in _history("act/avg_steps", [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 1.0, 1.0])
             for w in ms.observe(r)]
    assert fired == [40, 80]


def test_shipped_monitors_load():
    ids = {m.id for m in load_monitors("phase1")}
    assert {"C1-act-avg-steps", "C1-gate-entropy", "D3-qk-clip-count", "D2-ortho-error",
            "C2-step-losses-ordered", "A1-loss-decreasing", "B2-loss-spike"} <= ids
    tiny = {m.id: m for m in load_monitors("tiny")}
    assert tiny["C1-act-avg-steps"].after_step == 50 and tiny["C1-act-avg-steps"].min == 1.5


# ------------------------------------------------------------------------------------------ merge

def test_slerp_endpoints_and_midpoint():
    torch.manual_seed(0)
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    u, v = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = slerp(u, v, 0.5)
    assert torch.allclose(mid, torch.tensor([0.5 ** 0.5, 0.5 ** 0.5]), atol=1e-6)  # on the circle
    assert torch.allclose(slerp(a, a, 0.3), a, atol=1e-6)


def test_merge_rejects_incompatible_weights():
    with pytest.raises(ForgeError, match="shapes"):
        merge_state_dicts({"w": torch.zeros(2)}, {"w": torch.zeros(3)}, "slerp", 0.5)
    out = merge_state_dicts({"w": torch.zeros(2)}, {"w": torch.ones(2)}, "linear", 0.25)
    assert torch.allclose(out["w"], torch.full((2,), 0.25))
