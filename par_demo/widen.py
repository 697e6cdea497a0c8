"""Widen a trained LLaVA's Llama decoder without changing what it computes (function-preserving growth, as in
Net2Net, Chen et al. 2016), so that training the wider model starts from the narrower one's answers instead of
from scratch.

The residual stream gets new dimensions, attention gets new heads (of the same head size) and the MLP new neurons.
What keeps the function:
  - nothing writes to a new residual dimension: the embeddings, the projector's output and every o_proj / down_proj
    have zero rows there, so it stays exactly 0;
  - nothing reads a new head or neuron into the residual: o_proj / down_proj (and the projector's second layer, for
    its new hidden units) have zero columns there;
  - RMSNorm divides by the root mean square over all dimensions, which the zeros make sqrt(width / old width)
    smaller: its weights are scaled by sqrt(old / new) and its epsilon by old / new, which gives back the same
    numbers (to float rounding).
Weights that read the residual stream (q/k/v, gate/up, the LM head) and the new heads' and neurons' own weights keep
the wider model's random initialisation: they multiply zeros at first and give the new dimensions their gradients
as soon as training starts. The vision tower is copied as it is.
"""

from __future__ import annotations

import math

import torch
from transformers import LlavaForConditionalGeneration

from par_demo.errors import UserError

# Parameters that write into the residual stream: their new rows (new residual dimensions) and new columns (new
# heads, neurons, projector units) start at 0
WRITERS = ("self_attn.o_proj.weight", "mlp.down_proj.weight", "multi_modal_projector.linear_2.weight",
           "multi_modal_projector.linear_2.bias", "embed_tokens.weight")
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "language_model.norm.weight")


def check_growable(source, target) -> None:
    """The target must be the source with a wider decoder only: same tower, layers, vocabulary and head size."""
    s, t = source.config.text_config, target.config.text_config
    tower = [{name: p.shape for name, p in m.model.vision_tower.named_parameters()} for m in (source, target)]
    same = {"layers": (s.num_hidden_layers, t.num_hidden_layers), "vocabulary": (s.vocab_size, t.vocab_size),
            "head size": (s.head_dim, t.head_dim), "vision tower": tuple(tower)}
    differ = [name for name, (a, b) in same.items() if a != b]
    if differ:
        raise UserError(f"can only widen the decoder; the models differ in: {', '.join(differ)}")
    grows = {"width": (s.hidden_size, t.hidden_size), "heads": (s.num_attention_heads, t.num_attention_heads),
             "key/value heads": (s.num_key_value_heads, t.num_key_value_heads),
             "MLP width": (s.intermediate_size, t.intermediate_size)}
    shrinks = [f"{name} {a} -> {b}" for name, (a, b) in grows.items() if b < a]
    if shrinks:
        raise UserError(f"can only widen the decoder, not narrow it: {'; '.join(shrinks)}")
    if s.num_attention_heads // s.num_key_value_heads != t.num_attention_heads // t.num_key_value_heads:
        raise UserError("widening keeps each key/value head's group of query heads: heads and key/value heads must "
                        "grow by the same factor")


@torch.no_grad()
def widen_into(source: LlavaForConditionalGeneration, target: LlavaForConditionalGeneration) -> None:
    """Overwrite `target` (freshly initialised, wider decoder) so that it computes what `source` computes."""
    check_growable(source, target)
    old, new = source.config.text_config.hidden_size, target.config.text_config.hidden_size
    target.config.text_config.rms_norm_eps = source.config.text_config.rms_norm_eps * old / new
    for module in target.modules():  # the norms read their epsilon from the config once, when built
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = target.config.text_config.rms_norm_eps
    have = source.state_dict()
    for name, param in target.state_dict().items():
        src = have[name]
        if name.endswith(NORMS):
            param.fill_(math.sqrt(old / new))
            param[:src.shape[0]] = src * math.sqrt(old / new)
            continue
        block = tuple(slice(0, n) for n in src.shape)
        if name.endswith(WRITERS):
            param.zero_()
        param[block] = src
