"""ModelState: a parallel pass equals sequential steps, and rollback + re-advance equals a fresh run,
on the tiny pairs and on GPT-2, Qwen2, BART and MT5 architectures."""

from __future__ import annotations

import pytest
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


# Cache surgery must serve every family the issue names, not only the two tiny pairs. Random weights are
# fine here: the checks compare logits of the same model along two paths, not outputs of two models.
def _random_model(arch: str):
    from transformers import (BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel, MT5Config,
                              MT5ForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(0)
    small = dict(vocab_size=128)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, **small))
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, **small))
    if arch == "bart":
        return BartForConditionalGeneration(BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                                       decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, **small))
    return MT5ForConditionalGeneration(MT5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, **small))



@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "bart", "mt5"])
def test_cache_surgery_across_architectures(arch):
    model = _random_model(arch).eval()
    enc = torch.tensor([[5, 6, 7, 8, 9, 10]]) if model.config.is_encoder_decoder else None
    seq = torch.tensor([[2, 11, 12, 13, 14, 15, 16]])
    # Parallel pass == token-by-token pass.
    par = ModelState(model, enc).advance(seq, keep=seq.shape[1])
    st = ModelState(model, enc)
    step = torch.cat([st.advance(seq[:, i : i + 1]) for i in range(seq.shape[1])])
    torch.testing.assert_close(par, step, atol=1e-5, rtol=1e-5)
    # Roll back 3 tokens, feed different ones: same as a fresh pass over the new sequence.
    st.rollback(4)
    new = torch.tensor([[20, 21, 22]])
    fresh = ModelState(model, enc).advance(torch.cat([seq[:, :4], new], 1), keep=3)
    torch.testing.assert_close(st.advance(new, keep=3), fresh, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "mt5"])
def test_first_layers_is_a_working_shallower_model(arch):
    from bildexp.layerwise import first_layers

    model = _random_model(arch).eval()
    draft = first_layers(model, 1)
    enc = torch.tensor([[5, 6, 7]]) if model.config.is_encoder_decoder else None
    seq = torch.tensor([[2, 11, 12]])
    full, short = ModelState(model, enc).advance(seq, keep=3), ModelState(draft, enc).advance(seq, keep=3)
    assert short.shape == full.shape and not torch.allclose(short, full)
    assert sum(p.numel() for p in draft.parameters()) < sum(p.numel() for p in model.parameters())
    # Same embeddings and head, untouched original.
    assert torch.equal(draft.get_output_embeddings().weight, model.get_output_embeddings().weight)
    assert draft.get_output_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    # share=True: the same shallower model over the model's own tensors (an exit to evaluate, no copy of the weights).
    view = first_layers(model, 1, share=True)
    torch.testing.assert_close(ModelState(view, enc).advance(seq, keep=3), short, atol=0, rtol=0)
    assert {p.data_ptr() for p in view.parameters()} <= {p.data_ptr() for p in model.parameters()}
    torch.testing.assert_close(ModelState(model, enc).advance(seq, keep=3), full, atol=0, rtol=0)  # model untouched
