"""BiLD Figure 8: FLOPs, memory operations and arithmetic intensity of a run, from the models' shapes and
the tokens each forward pass actually processed.

`ModelState` meters every forward pass of a policy's models (counters <role>_passes, _pass_tokens,
_pass_head_tokens, _pass_context, _pass_attention, _pass_cross_context, _pass_cross_attention, _encoder_runs,
_encoder_tokens, _encoder_attention; role = large or small). Everything below is linear in those counters, so
the sums over a run's examples price the whole run exactly under this model of a transformer decoder step of
k new tokens after c cached ones (source length s), h of them through the LM head (the `keep` positions whose
logits the policy reads; a path that computes the head everywhere and drops the rest is not charged for that):

  FLOPs  2 · k · decoder layer weights + 2 · h · LM-head weights    one multiply-add per weight and token
       + 4 · attention width · layers · query-key pairs               QKᵀ and the weighted sum of V, self and cross
  bytes  weight bytes of the decoder layers and the LM head           read once per forward pass, whatever k is
       + 2 · kv width · layers · (c + k + s) · bytes                  K and V read from the caches and written

and, once per example and model, the encoder and the cross-attention K/V projections of its output (T5's
EncDecAttention k and v, computed once and cached, so not part of the decoder layer weights above):
2 · s · (encoder weights + cross K/V weights) + the encoder's attention, those weights read once. Ignored:
norms' arithmetic, softmax, activations between layers. Batch 1, as in the paper, is where the weight term
dominates the bytes, which is what makes a k-token pass nearly as cheap as a 1-token one in time.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel

from bildexp.layerwise import SUPPORTED, decoder_layers
from bildexp.quant import linear_weights

ROLES = ("large", "small")


@dataclass(frozen=True)
class ModelCost:
    decoder_weights: int  # decoder layer parameters, less the cross-attention K/V projections
    head_weights: int  # the LM head (embeddings are looked up, not multiplied)
    encoder_weights: int  # 0 for decoder-only models
    cross_kv_weights: int  # the decoder's cross-attention K/V projections (run once over the encoder output)
    layers: int
    encoder_layers: int
    attention_width: int  # heads x head size of the queries
    kv_width: int  # kv heads x head size of the cached keys (= values)
    bytes_per_weight: float  # the pair's dtype, or less for weight-only quantized layers (int4: ~0.53)
    kv_bytes: int  # bytes per cached key or value element

    @classmethod
    def of(cls, model: PreTrainedModel) -> ModelCost | None:
        """The shapes of a t5, mt5, llama or qwen2 model (None for other architectures: not priced). Weight-only
        quantized layers (bildexp/quant.py) count their weights and are read at their codes' and scales' bytes."""
        cfg = model.config
        if cfg.model_type not in SUPPORTED:
            return None
        head, head_bytes = linear_weights(model.get_output_embeddings())
        layers = decoder_layers(model)
        dec, dec_bytes = linear_weights(layers)
        kv_bytes = model.dtype.itemsize  # the caches keep the pair's dtype
        if cfg.is_encoder_decoder:  # T5, mT5
            cross_kv = sum(linear_weights(m)[0] for name, m in layers.named_modules()
                           if name.split(".")[-1] in ("k", "v") and ".EncDecAttention." in f".{name}")
            enc = linear_weights(model.get_encoder().block)[0]
            width = cfg.num_heads * cfg.d_kv
            return cls(dec - cross_kv, head, enc, cross_kv, len(layers), cfg.num_layers, width, width,
                       (dec_bytes + head_bytes) / (dec + head), kv_bytes)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return cls(dec, head, 0, 0, len(layers), 0, cfg.num_attention_heads * head_dim, kv_heads * head_dim,
                   (dec_bytes + head_bytes) / (dec + head), kv_bytes)

    def flops(self, counters: dict[str, int], role: str) -> float:
        c = lambda key: counters.get(f"{role}_{key}", 0)  # noqa: E731
        attention = c("pass_attention") + c("pass_cross_attention")
        decoder = 2 * c("pass_tokens") * self.decoder_weights + 2 * c("pass_head_tokens") * self.head_weights
        decoder += 4 * self.attention_width * self.layers * attention
        encoder = 2 * c("encoder_tokens") * (self.encoder_weights + self.cross_kv_weights)
        encoder += 4 * self.attention_width * self.encoder_layers * c("encoder_attention")
        return float(decoder + encoder)

    def memory_bytes(self, counters: dict[str, int], role: str) -> float:
        c = lambda key: counters.get(f"{role}_{key}", 0)  # noqa: E731
        b = self.bytes_per_weight
        kv = 2 * self.kv_width * self.layers * (c("pass_context") + c("pass_tokens") + c("pass_cross_context")) * self.kv_bytes
        weights = c("passes") * (self.decoder_weights + self.head_weights)
        weights += c("encoder_runs") * (self.encoder_weights + self.cross_kv_weights)
        return float(weights * b + kv)


def run_cost(counters: dict[str, int], models: dict[str, PreTrainedModel]) -> dict[str, float]:
    """Summed counters of a run + the model of each role → flops, memory_bytes, arithmetic_intensity
    (empty when no forward pass was metered, e.g. policies that run layer by layer, or a model is not priced)."""
    costs = {r: ModelCost.of(models[r]) for r in ROLES if counters.get(f"{r}_passes")}
    if not costs or None in costs.values():
        return {}
    flops = sum(cost.flops(counters, r) for r, cost in costs.items())
    mem = sum(cost.memory_bytes(counters, r) for r, cost in costs.items())
    return {"flops": flops, "memory_bytes": mem, "arithmetic_intensity": flops / mem}
