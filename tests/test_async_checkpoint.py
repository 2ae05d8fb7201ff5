"""Asynchronous checkpoints (checkpoint.async_save, F2): the write runs in a background thread on a snapshot
taken at save time, keeps the atomic tmp -> fsync -> manifest -> rename protocol, and a kill in the middle of
a background write leaves the previous checkpoint loadable."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import REPO, SPECS
from forge.model import build_model
from forge.spec.load import load_spec
from forge.train import checkpoint as ckpt

SMALL = ["model.vocab_size=64", "model.d_model=32", "model.n_heads=2", "model.ffn_hidden=48",
         "model.memory.d_mem=16", "model.memory.rank=4", "model.memory.chunk_size=8", "model.gate.hidden=16",
         "model.trm.ffn_hidden=48", "model.attention.sw_window=8"]


def small_model(seed: int = 0):
    torch.manual_seed(seed)
    spec = load_spec(SPECS / "tiny.toml", SMALL).spec
    return build_model(spec.model, spec.objective)


def test_background_write_saves_the_snapshot_not_later_changes(tmp_path):
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))).loss.backward()
    optimizer.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_moment = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    writer = ckpt.BackgroundWriter()
    writer.submit(ckpt.save_checkpoint, tmp_path, 1, *ckpt.snapshot(model, {"optimizer": optimizer.state_dict()}),
                  {"run_id": "r"})
    with torch.no_grad():                        # training goes on while the thread writes
        for p in model.parameters():
            p.add_(1.0)
    optimizer.step()
    writer.wait()
    fresh = small_model(seed=1)
    state, meta = ckpt.load_checkpoint(ckpt.latest_valid(tmp_path), fresh)
    assert meta["step"] == 1
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], expected_moment)
    # the tied embedding / LM head is stored once, as the synchronous save does
    ckpt.save_checkpoint(tmp_path, 2, model, {}, {})
    from safetensors import safe_open

    keys = lambda step: set(safe_open(str(tmp_path / ckpt.step_dir_name(step) / "model.safetensors"), "pt").keys())
    assert keys(1) == keys(2)


def test_an_error_in_the_background_write_reaches_the_training_thread(tmp_path):
    writer = ckpt.BackgroundWriter()
    (tmp_path / "file").write_text("not a directory")
    writer.submit(ckpt.save_checkpoint, tmp_path / "file", 1, *ckpt.snapshot(small_model(), {}), {})
    with pytest.raises(ckpt.CheckpointError, match="could not write checkpoint"):   # exit 2, path named
        writer.wait()
    writer.wait()                               # reported once


KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_async_checkpoint import small_model
    from forge.train import checkpoint as ckpt
    from pathlib import Path
    root = Path({root!r})
    model = small_model()
    big = {{"optimizer": {{"blob": torch.randn(4_000_000)}}}}      # ~16 MB: the write takes a while
    writer = ckpt.BackgroundWriter()
    writer.submit(ckpt.save_checkpoint, root, 1, *ckpt.snapshot(model, big), {{"run_id": "k"}})
    writer.wait()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for step in range(2, 1000):                                   # keep a background write going until killed
        writer.submit(ckpt.save_checkpoint, root, step, *ckpt.snapshot(model, big), {{"run_id": "k"}})
        print("writing", step, flush=True)
""")


def test_kill_during_a_background_write_leaves_a_loadable_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    script = KILLED_WRITER.format(tests=str(REPO / "tests"), root=str(root))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().startswith("writing 2")
        deadline = time.time() + 30
        while not list(root.glob(".tmp-*")) and time.time() < deadline:   # a write is under way
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert list(root.glob(".tmp-*"))              # killed in the middle of a write: its debris is there
    latest = ckpt.latest_valid(root)
    assert latest is not None
    model = small_model(seed=3)
    state, meta = ckpt.load_checkpoint(latest, model)
    reference = small_model()
    if meta["step"] > 1:                          # weights after the in-place change of the script
        with torch.no_grad():
            for p in reference.parameters():
                p.add_(1.0)
    for (k, v), w in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(v, w), k
    assert state["optimizer"]["blob"].shape == (4_000_000,)
