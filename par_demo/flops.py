"""Analytic prefill FLOPs of a LLaVA model under a pruning plan.

Counts what dominates and what `torch.utils.flop_counter.FlopCounterMode` counts: matrix products (linear
layers, the patch convolution, attention scores and attention-weighted values), at 2 FLOPs per multiply-add.
Norms, activations and RoPE are elementwise and left out. Attention is counted as the full n x n product, as
FLOPs counters and the FastV/PAR papers do, although a causal kernel may skip half of it.

Prefill = vision tower (up to its feature layer) + projector + every decoder layer that runs (full sequence before
layer K, the kept sequence from K on) + the LM head at the last position + the router (when one is used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class FlopsModel:
    # vision tower
    vision_width: int
    vision_mlp: int
    vision_layers_run: int
    vision_tokens: int  # patches + CLS
    patch_flops: int  # the patch-embedding convolution, per patch
    drop_cls: bool
    # projector (two linear layers)
    projector_in: int
    projector_hidden: int
    # language model
    width: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    n_layers: int

    @classmethod
    def from_config(cls, config) -> "FlopsModel":
        v, t = config.vision_config, config.text_config
        n_patches = (v.image_size // v.patch_size) ** 2
        feature_layer = config.vision_feature_layer
        run = feature_layer if feature_layer >= 0 else v.num_hidden_layers + 1 + feature_layer
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        return cls(
            vision_width=v.hidden_size, vision_mlp=v.intermediate_size, vision_layers_run=run,
            vision_tokens=n_patches + 1, patch_flops=2 * v.hidden_size * v.num_channels * v.patch_size ** 2,
            drop_cls=config.vision_feature_select_strategy == "default",
            projector_in=v.hidden_size, projector_hidden=t.hidden_size,
            width=t.hidden_size, heads=t.num_attention_heads, kv_heads=t.num_key_value_heads, head_dim=head_dim,
            mlp=t.intermediate_size, vocab=t.vocab_size, n_layers=t.num_hidden_layers,
        )

    # ------------------------------------------------------------------------------------------ parts
    def vision(self) -> float:
        n, d, m = self.vision_tokens, self.vision_width, self.vision_mlp
        per_layer = 2 * n * d * d * 4 + 2 * 2 * n * n * d + 2 * 2 * n * d * m  # q,k,v,o + scores,AV + fc1,fc2
        return (n - 1) * self.patch_flops + self.vision_layers_run * per_layer

    def projector(self) -> float:
        n = self.vision_tokens - 1 if self.drop_cls else self.vision_tokens
        return 2 * n * (self.projector_in * self.projector_hidden + self.projector_hidden * self.projector_hidden)

    def decoder_layer(self, n: int) -> float:
        """One Llama layer over n tokens in prefill (causal, counted as full n x n)."""
        d, hd = self.width, self.head_dim
        projections = 2 * n * d * hd * (2 * self.heads + 2 * self.kv_heads)  # q, o and k, v
        attention = 2 * 2 * n * n * self.heads * hd
        mlp = 2 * 3 * n * d * self.mlp  # gate, up, down
        return projections + attention + mlp

    def attention_rows(self, n: int, rows: int = 1) -> float:
        """FastV's explicit scores: `rows` queries against n keys."""
        return 2 * rows * n * self.heads * self.head_dim

    def lm_head(self) -> float:
        return 2 * self.width * self.vocab

    # ------------------------------------------------------------------------------------------ totals
    def prefill(self, n_text: int, n_visual: int, kept_visual: int | None = None, skip_layers: Iterable[int] = (),
                start_layer: int = 2, router: float = 0.0, attention_rows: int = 0) -> float:
        """FLOPs of one prefill. `kept_visual` None keeps all visual tokens; `router` adds the router's own FLOPs."""
        skip = set(skip_layers)
        n_full = n_text + n_visual
        n_kept = n_text + (n_visual if kept_visual is None else kept_visual)
        total = self.vision() + self.projector() + self.lm_head() + router
        for i in range(self.n_layers):
            if i in skip:
                continue
            total += self.decoder_layer(n_full if i < start_layer else n_kept)
            if attention_rows and i == start_layer - 1:
                total += self.attention_rows(n_full, attention_rows)
        return total

    def full(self, n_text: int, n_visual: int) -> float:
        return self.prefill(n_text, n_visual)
