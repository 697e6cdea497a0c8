"""Pruned inference for a stock Hugging Face VLM: prefill and greedy decode under a `PruningPlan`.

Nothing is masked. From layer K on, dropped visual tokens are gathered *out* of the hidden states, so every later
layer works on a shorter sequence; skipped decoder layers are not called at all, in prefill and in every decode
step, and hold no KV cache. Attention is always `scaled_dot_product_attention`; the only scores ever computed
explicitly are the few rows FastV needs (the last position against all keys at layer K-1).

The decoder loop is written out here (norm -> q/k/v -> RoPE -> cache -> SDPA -> o_proj -> MLP) using the model's
own modules, so the reader sees every layer call, every gather and every position id. It runs Llama-style
decoders (LLaVA-1.5's Vicuna, Qwen2.5's layers with q/k/v biases), batch size 1. Everything before the decoder
(processor, vision path, where the visual tokens sit, rotary position ids) comes from the model's family
(`par_demo.families`): the engine never asks which family it runs. Position ids are whatever the family gives,
(1, L) for 1-D RoPE or (3, 1, L) for M-RoPE; the gather and the decode steps treat both alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from par_demo.errors import UserError
from par_demo.families import family_of
from par_demo.families.base import Query, language_model
from par_demo.families.views import encoded_views


@dataclass
class PruningPlan:
    """What to prune for one query. The empty plan runs the full model."""

    start_layer: int = 2  # K: visual tokens are dropped before layer K runs (layers < K see every token)
    keep_visual: torch.Tensor | None = None  # indices into the visual tokens (row-major patches); None = keep all
    keep_visual_count: int | None = None  # FastV rule: keep the top-k by layer K-1 attention (when keep_visual is None)
    # Merging methods (VisionZip's contextual tokens, pooled downsampling) give a kept token new input features: row i
    # replaces the features of visual token keep_visual[i], which keeps its own position. Input features only make
    # sense before the first layer, so only at K = 0.
    visual_features: torch.Tensor | None = None  # (len(keep_visual), D)
    # Proportional attention (ToMe, Bolya et al. 2023): kept visual token i stands for kept_sizes[i] >= 1 visual
    # tokens, itself and the dropped ones it absorbed (`methods/absorb.py`). From layer K on, every attention logit
    # towards its key gets + log(size), in prefill and decode, so what the absorbed tokens held of the attention
    # stays with their look-alike instead of being spread over the rest. Row i goes with keep_visual[i].
    kept_sizes: torch.Tensor | None = None  # (len(keep_visual),); None: each kept token is itself only
    skip_layers: frozenset[int] = frozenset()  # decoder layers that are not run at all
    token_scores: torch.Tensor | None = None  # per visual token, for display (router logits, attention, ...)
    layer_scores: torch.Tensor | None = None  # per layer, for display

    @property
    def prunes_tokens(self) -> bool:
        return self.keep_visual is not None or self.keep_visual_count is not None


class KVCache:
    """Per-layer key/value buffers, preallocated for prefill + decode. Skipped layers hold nothing."""

    def __init__(self, n_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.lengths = [0] * n_layers
        self.capacity = 0  # extra slots reserved beyond the prefill length
        # Proportional attention: the prompt's key bias (log sizes, 0 for text) of the layers from `bias_from` on
        self.key_bias: torch.Tensor | None = None  # (n_prompt_kept,)
        self.bias_from = 0

    def bias_for(self, layer: int) -> torch.Tensor | None:
        return self.key_bias if self.key_bias is not None and layer >= self.bias_from else None

    def reserve(self, extra: int) -> None:
        self.capacity = extra

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (1, n_kv_heads, n, head_dim) after what layer `layer` holds; return all its keys/values."""
        n = k.shape[2]
        start = self.lengths[layer]
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], n + self.capacity, k.shape[3])
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        elif start + n > self.keys[layer].shape[2]:  # out of reserved room: grow (rare: decode past the reservation)
            grow = max(n, 64)
            self.keys[layer] = torch.cat([self.keys[layer], k.new_empty(*k.shape[:2], grow, k.shape[3])], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v.new_empty(*v.shape[:2], grow, v.shape[3])], dim=2)
        self.keys[layer][:, :, start:start + n] = k
        self.values[layer][:, :, start:start + n] = v
        self.lengths[layer] = start + n
        return self.keys[layer][:, :, :start + n], self.values[layer][:, :, :start + n]

    def nbytes(self) -> int:
        return sum(2 * k[:, :, :n].numel() * k.element_size() for k, n in zip(self.keys, self.lengths) if k is not None)


@dataclass
class Prefill:
    logits: torch.Tensor  # (vocab,) next-token logits at the last position
    cache: KVCache
    kept_visual: torch.Tensor  # indices of the visual tokens that reached layers >= K
    next_position: int  # position of the first generated token (the unpruned prompt's, from the family)
    attention_to_image: torch.Tensor | None = None  # FastV scores (n_visual,), when computed
    hidden_states: list[torch.Tensor] = field(default_factory=list)  # per-layer outputs, when asked for


@dataclass
class Generation:
    tokens: list[int]
    plan: PruningPlan
    kept_visual: torch.Tensor
    prefill_s: float
    total_s: float
    kv_cache_bytes: int
    attention_to_image: torch.Tensor | None = None
    views: tuple[int, int] = (1, 1)  # (views the vision tower ran on, views of the image): tiles + global view
    plan_s: float = 0.0  # of prefill_s, the planner's share (a router pass, a similarity search, the budget search)


# Decoder norms that compute x * rsqrt(mean(x**2) + eps) * weight (Llama's, Qwen2's). In fp32 the fused kernel
# `F.rms_norm` gives the module's very bits in one call instead of six element-wise ones: on a short pruned sequence
# on the CPU, where dispatch and not arithmetic is most of a small layer's time, 0.3-0.5 ms of a 5-layer prefill of
# the embedded model (0.2 ms of its full one). In bf16/fp16 the module rounds before multiplying by the weight and the
# kernel after: there the module runs (exactness against stock `generate` on the GPU).
FUSABLE_NORMS = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen2_5_VLRMSNorm"})


def rms_norm(norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """`norm(h)`, fused where that changes nothing (`FUSABLE_NORMS`, fp32)."""
    if h.dtype == torch.float32 and norm.weight.dtype == torch.float32 and type(norm).__name__ in FUSABLE_NORMS:
        return F.rms_norm(h, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm(h)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q, k, cos, sin):
    """RoPE on (B, heads, n, head_dim) tensors; cos/sin are (B, n, head_dim) for the tokens' *original* positions."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def key_bias(n_keys: int, slots: torch.Tensor, sizes: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(n_keys,) proportional attention's key bias of a gathered sequence: log size at the kept visual tokens' places
    `slots` (sizes in the same order), 0 elsewhere (text). The log in fp32: bf16 would round sizes above 256 first."""
    return torch.zeros(n_keys, dtype=dtype, device=slots.device).index_put_(
        (slots,), sizes.to(slots.device).float().log().to(dtype))


def attention_mask(key_bias: torch.Tensor, n_queries: int, n_keys: int) -> torch.Tensor:
    """Additive mask (..., 1, n_queries, n_keys) for the last n_queries of n_keys positions: causal, plus each key's
    bias. key_bias (..., n_bias) covers the first n_bias keys (the prompt); later keys (decoded tokens) get 0."""
    bias = F.pad(key_bias, (0, n_keys - key_bias.shape[-1]))  # (..., n_keys)
    future = torch.ones(n_queries, n_keys, dtype=torch.bool, device=bias.device).triu(n_keys - n_queries + 1)
    mask = bias[..., None, :].masked_fill(future, float("-inf"))  # (..., n_queries, n_keys)
    return mask.unsqueeze(-3)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Engine:
    """Runs one stock VLM under pruning plans. Holds references to its parts, no copies."""

    def __init__(self, model, family=None):
        self.model = model
        self.family = family or family_of(model)
        self.family.check_supported(model)
        self.lm = language_model(model)
        self.lm_head = model.lm_head
        self.layers = list(self.lm.layers)
        self.n_layers = len(self.layers)

    # ----------------------------------------------------------------------------------------- checks
    def validate_plan(self, plan: PruningPlan, query: Query) -> None:
        if not 0 <= plan.start_layer <= self.n_layers:
            raise UserError(f"pruning start layer must be in [0, {self.n_layers}], got {plan.start_layer}")
        bad = [i for i in plan.skip_layers if not 0 <= i < self.n_layers]
        if bad:
            raise UserError(f"skip_layers out of range [0, {self.n_layers - 1}]: {sorted(bad)}")
        if plan.keep_visual is not None:
            idx = plan.keep_visual
            if idx.numel() and (idx.min() < 0 or idx.max() >= query.n_visual or idx.unique().numel() != idx.numel()):
                raise UserError(f"keep_visual must be distinct indices in [0, {query.n_visual - 1}]")
        elif plan.keep_visual_count is not None:
            if not 0 <= plan.keep_visual_count <= query.n_visual:
                raise UserError(f"visual tokens kept must be in [0, {query.n_visual}], got {plan.keep_visual_count}")
            if plan.start_layer == 0:
                raise UserError("attention-ranked token pruning needs a start layer >= 1 (it ranks at layer K-1)")
            if plan.start_layer - 1 in plan.skip_layers:
                raise UserError(f"attention-ranked token pruning needs layer {plan.start_layer - 1} to run")
        if query.partial:  # views the tower never ran on hold no features: their tokens must never enter a layer
            kept = plan.keep_visual
            if plan.start_layer != 0 or kept is None or not bool(query.encoded[kept].all()):
                raise UserError("the tower ran on some views of this image only: a plan must keep tokens of those "
                                "views alone, from the first layer (start layer 0)")
        if plan.kept_sizes is not None:
            n_keep = -1 if plan.keep_visual is None else plan.keep_visual.numel()
            if plan.kept_sizes.shape != (n_keep,) or bool((plan.kept_sizes < 1).any()):
                raise UserError("kept token sizes need one value >= 1 per kept visual token")
        if plan.visual_features is not None:
            n_keep = -1 if plan.keep_visual is None else plan.keep_visual.numel()
            if plan.start_layer != 0 or plan.visual_features.shape != (n_keep, query.image_features.shape[1]):
                raise UserError("replacement visual features need start layer 0 and one row of the model's width per "
                                "kept visual token")

    # ----------------------------------------------------------------------------------------- inputs
    @torch.inference_mode()
    def prepare(self, inputs: dict, overview_only: bool = False) -> Query:
        """Model inputs (from the family's `encode`) -> embeddings, visual tokens and positions (family's `prepare`).
        `overview_only`: a tiled image's tower runs on its global view alone; the planner encodes more on demand."""
        return self.family.prepare(self.model, inputs, overview_only=overview_only)

    @torch.inference_mode()
    def extend(self, query: Query, token_ids: list[int]) -> Query:
        """The query with text tokens appended after the prompt (an answer, for teacher forcing). They take the
        positions decoding would give them: next_position, next_position + 1, ... on every rotary axis."""
        if not token_ids:
            return query
        ids = torch.tensor([token_ids], device=query.input_ids.device)
        embeds = self.lm.embed_tokens(ids).to(query.inputs_embeds.dtype)
        steps = query.next_position + torch.arange(len(token_ids), device=ids.device)
        new_positions = steps.expand(*query.positions.shape[:-1], len(token_ids))
        return replace(query, input_ids=torch.cat([query.input_ids, ids], dim=1),
                       inputs_embeds=torch.cat([query.inputs_embeds, embeds], dim=1),
                       positions=torch.cat([query.positions, new_positions], dim=-1),
                       next_position=query.next_position + len(token_ids))

    # ----------------------------------------------------------------------------------------- layers
    def run_layer(self, index: int, h: torch.Tensor, rope, cache: KVCache | None, score_rows: int = 0,
                  mask: torch.Tensor | None = None):
        """One decoder layer on h (B, n, D). Returns (h, attention rows of the last `score_rows` queries or None).

        Inference uses B = 1 and the cache; router training runs right-padded batches of pruned sequences without
        a cache (causal attention keeps every real token blind to the padding after it). `mask` (B, 1, n, n_keys):
        an additive attention mask (`attention_mask`: causal + proportional attention's log sizes), else causal."""
        layer = self.layers[index]
        attn = layer.self_attn
        b, n = h.shape[:2]
        x = rms_norm(layer.input_layernorm, h)
        q = attn.q_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)  # (B, heads, n, hd)
        k = attn.k_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)  # (B, kv_heads, n, hd)
        v = attn.v_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, *rope)
        if cache is not None:
            k, v = cache.append(index, k, v)
        gqa = q.shape[1] != k.shape[1]
        if gqa and mask is not None and q.device.type == "cuda":
            # CUDA's fused SDPA kernels take a mask or grouped keys, not both (it would fall back to the math
            # kernel): with a mask, the key/value heads are repeated here instead (as transformers does).
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
            gqa = False
        # Prefill: causal over the (possibly gathered) sequence, whose order is the original order.
        # Decode: one query against every cached key, no mask needed. With proportional attention: both as a mask.
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype),
                                           is_causal=n > 1 and mask is None, scale=attn.scaling, enable_gqa=gqa)
        scores = self._attention_rows(q[:, :, -score_rows:], k, attn.scaling) if score_rows else None
        h = h + attn.o_proj(o.transpose(1, 2).reshape(b, n, -1))
        h = h + layer.mlp(rms_norm(layer.post_attention_layernorm, h))
        return h, scores

    @staticmethod
    def _attention_rows(q_rows: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        """Softmax attention of a few (last) queries over all keys, averaged over heads and rows -> (n_keys,)."""
        groups = q_rows.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        logits = (q_rows.float() @ k.float().transpose(-1, -2)) * scale  # (1, H, r, n)
        r, n = logits.shape[-2:]
        future = torch.ones(r, n, dtype=torch.bool, device=logits.device).triu(n - r + 1)  # as the layer's causal mask
        weights = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
        return weights.mean(dim=(0, 1, 2))

    def rope(self, h: torch.Tensor, positions: torch.Tensor):
        return self.lm.rotary_emb(h, positions)

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.lm_head(rms_norm(self.lm.norm, h_last)).float().reshape(-1)

    # ----------------------------------------------------------------------------------------- prefill
    @torch.inference_mode()
    def prefill(self, query: Query, plan: PruningPlan, reserve: int = 0, keep_hidden: bool = False,
                score_rows: int = 1, n_logits: int = 1) -> Prefill:
        """`n_logits` > 1 returns logits (n_logits, vocab) for the last n_logits positions (teacher forcing)."""
        self.validate_plan(plan, query)
        h = query.inputs_embeds
        positions = query.positions  # (1, L) or (3, 1, L)
        # tokens dropped before the first layer: the whole sequence's rotary tables would never be read
        rope = None if plan.start_layer == 0 and plan.prunes_tokens else self.rope(h, positions)
        cache = KVCache(self.n_layers)
        cache.reserve(reserve)
        kept_visual = torch.arange(query.n_visual, device=h.device)
        attention_to_image, mask = None, None
        hidden = []
        for i in range(self.n_layers + 1):
            if i == plan.start_layer and plan.prunes_tokens:
                kept_visual, features, sizes = self._choose_visual(plan, query, attention_to_image)
                keep = self._kept_positions(query, kept_visual)
                h = h[:, keep]  # the gather: dropped tokens leave the sequence here
                slots = torch.searchsorted(keep, query.image_positions[kept_visual])  # kept visual tokens' places
                if features is not None:  # merged / pooled tokens take their representative token's place
                    h[0, slots] = features.to(h.dtype)
                if sizes is not None:  # proportional attention from here on: log(size) on each kept visual key
                    cache.key_bias, cache.bias_from = key_bias(keep.numel(), slots, sizes, h.dtype), i
                    mask = attention_mask(cache.key_bias[None], keep.numel(), keep.numel())  # one for every layer
                positions = positions[..., keep]  # ... and keep their original (1-D or 3-D) positions
                rope = self.rope(h, positions)
            if i == self.n_layers:
                break
            if i in plan.skip_layers:
                if keep_hidden:
                    hidden.append(h)
                continue
            wants_scores = plan.keep_visual_count is not None and i == plan.start_layer - 1
            h, rows = self.run_layer(i, h, rope, cache, score_rows if wants_scores else 0,
                                     mask if cache.bias_for(i) is not None else None)
            if rows is not None:
                attention_to_image = rows[query.image_positions]
            if keep_hidden:
                hidden.append(h)
        if n_logits == 1:
            logits = self.logits(h[:, -1])
        else:
            logits = self.lm_head(rms_norm(self.lm.norm, h[0, -n_logits:])).float()
        return Prefill(logits, cache, kept_visual, query.next_position, attention_to_image, hidden)

    @staticmethod
    def _choose_visual(plan: PruningPlan, query: Query, attention_to_image):
        """(kept visual token indices in sequence order, their replacement features and their sizes in the same
        order, or None)."""
        if plan.keep_visual is not None:
            kept, order = plan.keep_visual.to(query.image_positions.device).sort()
            features = None if plan.visual_features is None else plan.visual_features.to(kept.device)[order]
            sizes = None if plan.kept_sizes is None else plan.kept_sizes.to(kept.device)[order]
            return kept, features, sizes
        top = torch.topk(attention_to_image, plan.keep_visual_count).indices
        return top.sort().values, None, None

    @staticmethod
    def _kept_positions(query: Query, kept_visual: torch.Tensor) -> torch.Tensor:
        is_kept = torch.ones(query.length, dtype=torch.bool, device=query.input_ids.device)
        is_kept[query.image_positions] = False
        is_kept[query.image_positions[kept_visual]] = True
        return is_kept.nonzero().squeeze(1)

    # ----------------------------------------------------------------------------------------- decode
    @torch.inference_mode()
    def decode_step(self, token: int, position: int, cache: KVCache, plan: PruningPlan) -> torch.Tensor:
        """One new token through every non-skipped layer; its position continues the *unpruned* prompt's. A (1, 1)
        position id serves 1-D RoPE and M-RoPE alike (M-RoPE's rotary module repeats it on its three axes)."""
        h = self.lm.embed_tokens(torch.tensor([[token]], device=self.lm_head.weight.device))
        rope = self.rope(h, torch.tensor([[position]], device=h.device))
        mask = None  # proportional attention: one row over the prompt's keys (log sizes) and those decoded since
        for i in range(self.n_layers):
            if i not in plan.skip_layers:
                bias = cache.bias_for(i)
                if bias is not None and mask is None:
                    mask = attention_mask(bias[None], 1, cache.lengths[i] + 1)
                h, _ = self.run_layer(i, h, rope, cache, mask=mask if bias is not None else None)
        return self.logits(h[:, -1])

    @torch.inference_mode()
    def generate(self, inputs: dict, planner: Callable[[Query], PruningPlan] | None = None, max_new_tokens: int = 16,
                 eos_token_id: int | list[int] | None = None, overview_only: bool = False) -> Generation:
        """Greedy generation. Timing covers everything from pixels to tokens (vision, planning, prefill, decode).
        `overview_only`: the planner chooses which views of a tiled image the tower runs on (`Query.encode_views`)."""
        device = self.lm_head.weight.device
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
        synchronize(device)
        start = time.perf_counter()
        query = self.prepare(inputs, overview_only)
        plan, plan_s = PruningPlan(), 0.0
        if planner is not None:  # timed apart; the full model's path gets no extra synchronisation
            synchronize(device)  # on a GPU the tower's kernels finish here, not inside the planner's time
            planning = time.perf_counter()
            plan = planner(query)
            synchronize(device)
            plan_s = time.perf_counter() - planning
        pre = self.prefill(query, plan, reserve=max_new_tokens)
        token = int(pre.logits.argmax())
        synchronize(device)
        prefill_s = time.perf_counter() - start
        tokens = [token]
        position = pre.next_position
        while len(tokens) < max_new_tokens and token not in eos:
            token = int(self.decode_step(token, position, pre.cache, plan).argmax())
            tokens.append(token)
            position += 1
        synchronize(device)
        total_s = time.perf_counter() - start
        views = (len(encoded_views(query)), max(len(query.layout.tiles), 1))
        return Generation(tokens, plan, pre.kept_visual, prefill_s, total_s, pre.cache.nbytes(),
                          pre.attention_to_image, views, plan_s)
