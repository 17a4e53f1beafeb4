"""ModelState: a parallel pass equals sequential steps, and rollback + re-advance equals a fresh run."""

from __future__ import annotations

import torch

from bildexp.cache import ModelState
from bildexp.tasks import encode

from conftest import make_config


def _setup(pair, examples):
    prompt, _ = encode(examples[0], make_config().task, pair)
    cont = torch.tensor([[5, 17, 33, 8, 41, 12]])  # arbitrary continuation ids inside the vocabulary
    seq = torch.cat([torch.tensor([prompt.decoder_prefix]), cont], dim=1)
    return prompt, seq


def test_parallel_equals_sequential(tiny_pair, toy_examples):
    prompt, seq = _setup(tiny_pair, toy_examples)
    par = ModelState(tiny_pair.large, prompt.encoder_input_ids).advance(seq, keep=seq.shape[1])
    state = ModelState(tiny_pair.large, prompt.encoder_input_ids)
    seqlog = torch.cat([state.advance(seq[:, i : i + 1]) for i in range(seq.shape[1])])
    assert state.length == seq.shape[1]
    torch.testing.assert_close(par, seqlog, atol=1e-5, rtol=1e-5)


def test_rollback_then_advance_equals_fresh(tiny_pair, toy_examples):
    prompt, seq = _setup(tiny_pair, toy_examples)
    n = seq.shape[1]
    state = ModelState(tiny_pair.large, prompt.encoder_input_ids)
    state.advance(seq)
    state.rollback(n - 3)
    assert state.length == n - 3 == state.cache.get_seq_length()
    other = torch.tensor([[9, 10, 11]])
    after = state.advance(other, keep=3)
    fresh = ModelState(tiny_pair.large, prompt.encoder_input_ids).advance(torch.cat([seq[:, : n - 3], other], 1), keep=3)
    torch.testing.assert_close(after, fresh, atol=1e-5, rtol=1e-5)


def test_keep_returns_last_positions(tiny_pair, toy_examples):
    prompt, seq = _setup(tiny_pair, toy_examples)
    full = ModelState(tiny_pair.small, prompt.encoder_input_ids).advance(seq, keep=seq.shape[1])
    last2 = ModelState(tiny_pair.small, prompt.encoder_input_ids).advance(seq, keep=2)
    assert last2.shape == (2, full.shape[1])
    torch.testing.assert_close(last2, full[-2:], atol=1e-5, rtol=1e-5)
