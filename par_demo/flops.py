"""Analytic prefill FLOPs of a vision-language model under a pruning plan.

Counts what dominates and what `torch.utils.flop_counter.FlopCounterMode` counts: matrix products (linear
layers, the patch convolution, attention scores and attention-weighted values), at 2 FLOPs per multiply-add.
Norms, activations and RoPE are elementwise and left out. Attention is counted as the full n x n product, as
FLOPs counters and the FastV/PAR papers do, although a causal kernel may skip half of it.

Prefill = vision path (the family's count for this image: tower + connector) + every decoder layer that runs
(full sequence before layer K, the kept sequence from K on) + the LM head at the last position + the router or the
method's own selection work (when there is one). The decoder part is the same for every family here (Llama-style
layers); the vision part differs per image, so it travels with the query (`Query.vision_flops`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol


class QueryShape(Protocol):
    """What FLOPs depend on: a `Query`, or anything with these three numbers."""

    n_text: int
    n_visual: int
    vision_flops: float


@dataclass(frozen=True)
class Shape:
    n_text: int
    n_visual: int
    vision_flops: float

    @classmethod
    def of(cls, query: QueryShape) -> "Shape":
        return cls(int(query.n_text), int(query.n_visual), float(query.vision_flops))


@dataclass(frozen=True)
class FlopsModel:
    width: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    n_layers: int

    @classmethod
    def from_config(cls, config) -> "FlopsModel":
        t = config.text_config
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        return cls(width=t.hidden_size, heads=t.num_attention_heads, kv_heads=t.num_key_value_heads,
                   head_dim=head_dim, mlp=t.intermediate_size, vocab=t.vocab_size, n_layers=t.num_hidden_layers)

    # ------------------------------------------------------------------------------------------ parts
    def decoder_layer(self, n: int) -> float:
        """One Llama-style layer over n tokens in prefill (causal, counted as full n x n)."""
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
    def prefill(self, query: QueryShape, kept_visual: int | None = None, skip_layers: Iterable[int] = (),
                start_layer: int = 2, router: float = 0.0, attention_rows: int = 0) -> float:
        """FLOPs of one prefill. `kept_visual` None keeps all visual tokens; `router` adds the router's own FLOPs
        (or whatever work a method does to choose its tokens: VisionZip's attention row, DivPrune's distances)."""
        skip = set(skip_layers)
        n_full = query.n_text + query.n_visual
        n_kept = query.n_text + (query.n_visual if kept_visual is None else kept_visual)
        total = query.vision_flops + self.lm_head() + router
        for i in range(self.n_layers):
            if i in skip:
                continue
            total += self.decoder_layer(n_full if i < start_layer else n_kept)
            if attention_rows and i == start_layer - 1:
                total += self.attention_rows(n_full, attention_rows)
        return total

    def full(self, query: QueryShape) -> float:
        """The unpruned prefill of the query's image (of the whole image, for a query cut down by `restrict`)."""
        return self.prefill(getattr(query, "whole", None) or query)
