"""Packing, the weighted mixture, the resumable training loader and the held-out eval batches."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from conftest import SPECS
from forge.data import Data, TrainLoader, bits_per_byte, build_data
from forge.data.mixture import MixtureSchedule
from forge.data.packing import DocArray, PackedStream, concat_with_eos, sequential_rows
from forge.errors import ForgeError
from forge.spec.data import DataSpec
from forge.spec.load import load_spec

EOS = 0


def _docs(lengths: list[int], base: int = 0) -> DocArray:
    """Document i holds the tokens base + 1000 i + 1, +2, ...: every token says where it came from."""
    tokens = np.concatenate([base + 1000 * i + np.arange(1, n + 1) for i, n in enumerate(lengths)])
    return DocArray(tokens.astype(np.uint32), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def _split_at_eos(tokens: np.ndarray) -> list[list[int]]:
    pieces, current = [], []
    for t in tokens.tolist():
        if t == EOS:
            pieces.append(current)
            current = []
        else:
            current.append(t)
    return pieces


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Data:
    """The tiny spec's built-in corpus, prepared once per session (the cache is shared by the data tests)."""
    spec = load_spec(SPECS / "tiny.toml").spec
    return build_data(spec.data, vocab_size=spec.model.vocab_size, seed=spec.run.seed,
                      cache_dir=tmp_path_factory.getbasetemp() / "forge-data-cache")


def _with(data: Data, **changes) -> Data:
    """The same prepared sources under a changed [data] section (validated)."""
    spec = DataSpec.model_validate({**data.spec.model_dump(), **changes})
    return Data(spec, data.tokenizer, data.sources, data.seed)


# -------------------------------------------------------------------------------------------- packing

def test_an_epoch_is_every_document_once_each_followed_by_eos():
    docs = _docs([5, 1, 9, 3, 7, 2, 6, 4])
    stream = PackedStream("s", docs, EOS, seed=3)
    epoch = stream.read(0, stream.epoch_tokens)
    assert stream.epoch_tokens == docs.n_tokens + len(docs)
    order = stream.permutation(0)
    assert sorted(order.tolist()) == list(range(8)) and (epoch == concat_with_eos(docs, EOS, order)).all()
    assert _split_at_eos(epoch) == [docs.doc(i).tolist() for i in order]
    assert not (stream.permutation(1) == order).all()                             # reshuffled every epoch
    across = stream.read(stream.epoch_tokens - 4, 10)                              # a read spans two epochs
    assert (across == np.concatenate([epoch[-4:], concat_with_eos(docs, EOS, stream.permutation(1))[:6]])).all()
    assert (PackedStream("s", docs, EOS, seed=3).read(0, 50) == stream.read(0, 50)).all()
    assert not (PackedStream("s", docs, EOS, seed=4).permutation(0) == order).all()


def test_rows_lose_no_token_and_targets_are_inputs_shifted():
    stream = PackedStream("s", _docs([5, 1, 9, 3, 7, 2, 6, 4]), EOS, seed=0)
    loader = TrainLoader([stream], [1.0], batch_size=4, grad_accum=1, seq_len=8, curriculum=[], seed=0)
    batches = [loader.next_batch(step) for step in range(10)]          # 320 targets: several epochs
    idx = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    assert (targets[:, :-1] == idx[:, 1:]).all() and (idx[1:, 0] == targets[:-1, -1]).all()
    flat = torch.cat([idx[0, :1], targets.reshape(-1)]).numpy()
    assert (flat == stream.read(0, len(flat))).all()                    # the stream, in order, nothing lost
    assert loader.tokens_per_source == {"s": len(flat) - 1}


def test_sequential_rows_make_every_position_a_target_once():
    stream = np.arange(1, 40)
    rows = sequential_rows(stream, 8)
    assert rows.shape == (4, 9)
    assert (np.concatenate([rows[0, :1], rows[:, 1:].reshape(-1)]) == stream[:33]).all()
    assert sequential_rows(stream[:8], 8).shape == (0, 9)


# -------------------------------------------------------------------------------------------- mixture

def test_mixture_schedule_follows_the_weights_row_by_row():
    weights = [0.3, 0.2, 0.2, 0.3]
    schedule = MixtureSchedule(weights)
    for n in range(1, 3001):
        schedule.next_source()
        assert max(abs(r - w * n) for r, w in zip(schedule.rows, weights)) <= 0.7 + 1e-9
    resumed = MixtureSchedule(weights, rows=schedule.rows)
    assert [resumed.next_source() for _ in range(50)] == [schedule.next_source() for _ in range(50)]


def test_realised_token_shares_measured_from_batch_contents():
    weights = [0.3, 0.2, 0.5]
    streams = [PackedStream(f"s{k}", _docs([40, 13, 70, 25], base=100_000 * (k + 1)), EOS, seed=1) for k in range(3)]
    loader = TrainLoader(streams, weights, batch_size=32, grad_accum=1, seq_len=64, curriculum=[], seed=1)
    counted = np.zeros(3)
    for step in range(20):
        _, targets = loader.next_batch(step)
        for row in targets.numpy():
            text = row[row != EOS]
            owner = set((text // 100_000 - 1).tolist())
            assert len(owner) == 1                                   # a row comes from one source
            counted[owner.pop()] += len(row)
    shares = counted / counted.sum()
    assert np.abs(shares - weights).max() < 0.02
    assert loader.tokens_per_source == {f"s{k}": int(counted[k]) for k in range(3)}


# --------------------------------------------------------------------------------------------- loader

def test_resumed_loader_sees_exactly_the_batches_it_would_have_seen(tiny):
    data = _with(tiny, curriculum=[{"from_step": 3, "seq_len": 256}])
    straight = data.train_loader()
    first = [straight.next_batch(step) for step in range(5)]
    assert first[0][0].shape == (8, 128) and first[4][0].shape == (8, 256)   # the curriculum switched at step 3
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)                   # as a checkpoint stores it
    resumed = data.train_loader(state)
    for step in range(5, 12):
        a, b = straight.next_batch(step), resumed.next_batch(step)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    fresh = data.train_loader()
    assert all(torch.equal(fresh.next_batch(s)[0], first[s][0]) for s in range(5))   # deterministic from the start


def test_resuming_with_other_data_or_seed_is_refused(tiny):
    state = tiny.train_loader().state_dict()
    other_seed = Data(tiny.spec, tiny.tokenizer, tiny.sources, tiny.seed + 1)
    with pytest.raises(ForgeError, match="run.seed changed"):
        other_seed.train_loader(state)
    with pytest.raises(ForgeError, match="the sources, filters or tokenizer changed"):
        tiny.train_loader({**state, "epoch_tokens": {**state["epoch_tokens"], "stdlib_code": 1}})


def test_micro_batches_split_the_global_batch(tiny):
    data = _with(tiny, grad_accum=2)
    micro = data.train_loader().micro_batches(0)
    idx, targets = data.train_loader().next_batch(0)
    assert len(micro) == 2 and micro[0][0].shape == (4, 128)
    assert torch.equal(torch.cat([m[0] for m in micro]), idx) and torch.equal(torch.cat([m[1] for m in micro]), targets)


def test_train_batches_come_from_both_builtin_sources_in_token_shares(tiny):
    report = tiny.mixture_report(10)
    assert {n: r["share"] for n, r in report["sources"].items()} == {"stdlib_code": 0.5, "pydoc_prose": 0.5}
    assert sum(r["tokens"] for r in report["sources"].values()) == 10 * 8 * 128


# ----------------------------------------------------------------------------------------------- eval

def test_eval_batches_are_fixed_bounded_and_count_bytes(tiny):
    for name in tiny.names:
        batches = tiny.eval_batches(name)
        assert 1 <= len(batches) <= tiny.spec.eval.max_batches
        assert all(b.idx.shape[0] <= tiny.micro_batch_size and b.idx.shape[1] == 128 for b in batches)
        again = Data(tiny.spec, tiny.tokenizer, tiny.sources, tiny.seed).eval_batches(name)
        assert all(torch.equal(a.idx, b.idx) and torch.equal(a.targets, b.targets) for a, b in zip(batches, again))
        stream = concat_with_eos(tiny.source(name).eval, tiny.tokenizer.eos_id)
        flat = torch.cat([batches[0].idx[0, :1]] + [b.targets.reshape(-1) for b in batches]).numpy()
        assert (flat == stream[:len(flat)]).all()
        for b in batches:
            assert torch.equal(b.target_bytes, torch.from_numpy(tiny.tokenizer.token_bytes)[b.targets])
            assert b.n_bytes == int(tiny.tokenizer.token_bytes[b.targets.numpy()].sum())
    assert tiny.eval_batches("pydoc_prose", seq_len=64)[0].idx.shape[1] == 64
    with pytest.raises(KeyError, match="no data source 'nope'"):
        tiny.eval_batches("nope")


def test_eval_documents_are_disjoint_from_training_documents(tiny):
    for source in tiny.sources:
        train = {tuple(source.train.doc(i).tolist()) for i in range(len(source.train))}
        held = {tuple(source.eval.doc(i).tolist()) for i in range(len(source.eval))}
        assert held and train and not (train & held)


def test_bits_per_byte_leaves_eos_out():
    nats = torch.tensor([[1.0, 5.0, 1.0], [2.0, 2.0, 2.0]])
    nbytes = torch.tensor([[3, 0, 2], [1, 1, 1]])
    assert bits_per_byte(nats, nbytes) == pytest.approx((1 + 1 + 6) / (math.log(2) * 8))
    with pytest.raises(ValueError, match="undefined"):
        bits_per_byte(nats, torch.zeros_like(nbytes))
