"""transformers' own assisted generation (`generate(assistant_model=...)`): an external reference
for the speculative policy, run through the harness so that it is timed and scored the same way.

It does not use the decode loop: `decode` hands the whole example to `pair.large.generate`.
- Greedy, or (cfg.sampling) transformers' speculative sampling with `temperature` and `top_p` (top_k
  off, as in our nucleus sampling). generate() draws from torch's GLOBAL random stream, so each example
  seeds it with torch.manual_seed(seed): reproducible, but it resets the global RNG.
- The assisted-generation knobs are read from the ASSISTANT's generation_config, not from generate()'s
  arguments, and transformers may change them between calls (the "heuristic" schedule writes
  num_assistant_tokens back; with scikit-learn installed the confidence threshold is refitted). So
  every example runs with a copy pinned to num_draft_tokens, the "constant" schedule and confidence
  threshold 0.0 (0 turns the early stop and its refit off; None would mean the 0.4 default), and the
  assistant's own config is put back afterwards.
- Encoder-decoder pairs get an explicit decoder_input_ids + decoder_attention_mask: without the mask,
  transformers 5.23 re-feeds the assistant's whole decoder sequence on top of its cache every round
  (output still exact, since the large model verifies, but the drafts and their acceptance are wrong).
- generate() does not say which tokens were drafted, so provenance is all L and the only counters are
  output_tokens and large_calls (forward passes of the large model, counted with a forward hook: one
  per verification, the prompt pass included; greedy, they equal policy=speculative's, example by example).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from bildexp import BildexpError
from bildexp.policies.base import LARGE, Generation, Policy, Prompt


class HFAssisted(Policy):
    name = "hf_assisted"

    def decode(self, pair, prompt: Prompt, max_new_tokens: int, seed: int = 0) -> Generation:
        if pair.small_layers is not None:
            raise BildexpError("policy=hf_assisted needs two separate models: early-exit pairs are not supported")
        self.reset(seed, pair.device)
        torch.manual_seed(seed)  # generate() samples from the global stream
        with self.pinned_assistant(pair.small), self.count_calls(pair.large):
            tokens = self.generate(pair, prompt, max_new_tokens)
        self.counters["output_tokens"] = len(tokens)
        return Generation(tokens, LARGE * len(tokens), dict(self.counters))

    def generate(self, pair, prompt: Prompt, max_new_tokens: int) -> list[int]:
        kwargs = dict(
            assistant_model=pair.small,
            max_new_tokens=max_new_tokens,
            eos_token_id=list(pair.eos_token_ids),
            pad_token_id=pair.eos_token_ids[0],
            num_beams=1,
            do_sample=self.cfg.sampling,
        )
        if self.cfg.sampling:
            kwargs.update(temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=0)
        ids = torch.tensor([prompt.decoder_prefix], device=pair.device)  # [1, P]: [decoder_start] or the prompt
        if pair.is_encoder_decoder:
            # Without a decoder_attention_mask, transformers 5.23 feeds an encoder-decoder assistant the
            # whole decoder sequence on top of its cache each round, so it drafts from a corrupted context.
            kwargs.update(input_ids=prompt.encoder_input_ids, decoder_input_ids=ids, decoder_attention_mask=torch.ones_like(ids))
        else:
            kwargs.update(input_ids=ids, attention_mask=torch.ones_like(ids))
        with torch.inference_mode():
            out = pair.large.generate(**kwargs)[0].tolist()  # prefix + generated
        return out[len(prompt.decoder_prefix) :]

    @contextmanager
    def pinned_assistant(self, small) -> Iterator[None]:
        """The assistant's generation_config, pinned to this policy's knobs for one generate() call."""
        own = small.generation_config
        pinned = copy.deepcopy(own)
        pinned.num_assistant_tokens = self.cfg.num_draft_tokens
        pinned.num_assistant_tokens_schedule = "constant"
        pinned.assistant_confidence_threshold = 0.0
        small.generation_config = pinned
        try:
            yield
        finally:
            small.generation_config = own

    @contextmanager
    def count_calls(self, large) -> Iterator[None]:
        # A hook on the top-level module sees each decoder forward, not the encoder's (a submodule call).
        def hook(*_):
            self.counters["large_calls"] += 1

        handle = large.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()
