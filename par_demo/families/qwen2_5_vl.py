"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): dynamic resolution, a 2x2 patch merger and M-RoPE.

What differs from LLaVA:
- the image keeps its aspect ratio: it is resized to multiples of 28 px within [min_pixels, max_pixels] and gives
  one visual token per 28 x 28 px (14-px patches merged 2 x 2), so the token count and the grid vary per image;
- the vision tower (window attention in most blocks) and the merger run whole: `get_image_features`;
- positions are 3-D (temporal, row, column) from the model's own `get_rope_index`: text tokens count up on all
  three axes, visual tokens take their grid cell; decoding resumes at max(prompt positions) + 1 on all three;
- the tower has no CLS token, so the tower's own "dominance" score of a visual token (VisionZip's ranking) is the
  mean attention its 2 x 2 patches receive from every patch in the last full-attention block (`received_attention`).
The stock processor cannot be built where torchvision is missing (it needs a video processor), so inputs are made
from the image processor and the tokenizer exactly as it would: the chat template's one `<|image_pad|>` becomes
prod(image_grid_thw) / merge_size**2 of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from PIL import Image

from par_demo.errors import UserError
from par_demo.families.base import (Family, ImageTextProcessor, Layout, Query, check_prompt_length, embed_with_features,
                                   recorded_calls)

IMAGE_TOKEN, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# Qwen2.5-VL-Instruct's conversation format (system turn, image block, then the question).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_MIN_PIXELS = 4 * 28 * 28  # 4 visual tokens
DEFAULT_MAX_PIXELS = 1280 * 28 * 28  # 1,280 visual tokens, the model card's default


class Processor(ImageTextProcessor):
    """Image processor + tokenizer + chat template: what the stock `Qwen2_5_VLProcessor` would hold."""

    image_token = IMAGE_TOKEN
    default_chat_template = CHAT_TEMPLATE

    def size(self, options: dict) -> dict:
        """The image processor's pixel range, with --min-pixels / --max-pixels applied."""
        size = {"shortest_edge": self.image_processor.size["shortest_edge"],
                "longest_edge": self.image_processor.size["longest_edge"]}
        if options.get("min_pixels"):
            size["shortest_edge"] = int(options["min_pixels"])
        if options.get("max_pixels"):
            size["longest_edge"] = int(options["max_pixels"])
        if size["shortest_edge"] > size["longest_edge"]:
            raise UserError(f"--min-pixels ({size['shortest_edge']}) is above --max-pixels ({size['longest_edge']})")
        return size

    def images(self, image: Image.Image, options: dict) -> dict:
        return self.image_processor(images=image.convert("RGB"), return_tensors="pt", size=self.size(options))


@dataclass(frozen=True)
class Preset:
    vision_width: int
    vision_depth: int
    vision_heads: int
    vision_mlp: int
    full_attention_blocks: tuple[int, ...]
    lm_width: int
    lm_layers: int
    lm_heads: int
    lm_kv_heads: int
    lm_mlp: int
    vocab_size: int
    mrope_section: tuple[int, int, int]  # halves of head_dim given to (t, row, col)
    tie_embeddings: bool = False


PRESETS: dict[str, Preset] = {
    # Qwen2.5-VL-3B-Instruct and -7B-Instruct: the same 32-block, 1280-wide tower (full attention in blocks
    # 7, 15, 23, 31, 112-px windows elsewhere); Qwen2.5 decoders of 36 x 2048 and 28 x 3584.
    "qwen2.5-vl-3b": Preset(1280, 32, 16, 3420, (7, 15, 23, 31), 2048, 36, 16, 2, 11008, 151936, (16, 24, 24), True),
    "qwen2.5-vl-7b": Preset(1280, 32, 16, 3420, (7, 15, 23, 31), 3584, 28, 28, 4, 18944, 152064, (16, 24, 24)),
    # CPU-sized stand-in: a 448 x 448 image gives 256 visual tokens, a 672 x 448 one 384.
    "qwen2.5-vl-mid": Preset(256, 4, 4, 512, (3,), 768, 12, 12, 2, 2048, 8192, (8, 12, 12)),
    # Tiny, for tests: a 16-wide head (M-RoPE sections 2/3/3), grouped-query attention, 6 layers.
    "qwen2.5-vl-tiny": Preset(32, 2, 2, 64, (1,), 64, 6, 4, 2, 128, 512, (2, 3, 3)),
}


def build_config(preset: Preset, token_ids: dict[str, int]):
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=preset.vision_depth, hidden_size=preset.vision_width, num_heads=preset.vision_heads,
                  intermediate_size=preset.vision_mlp, out_hidden_size=preset.lm_width, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=list(preset.full_attention_blocks), hidden_act="silu")
    text = dict(hidden_size=preset.lm_width, num_hidden_layers=preset.lm_layers,
                num_attention_heads=preset.lm_heads, num_key_value_heads=preset.lm_kv_heads,
                intermediate_size=preset.lm_mlp, vocab_size=preset.vocab_size, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": list(preset.mrope_section)},
                bos_token_id=None, eos_token_id=token_ids[IM_END], pad_token_id=token_ids[END_OF_TEXT])
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=token_ids[IMAGE_TOKEN],
                            vision_start_token_id=token_ids[VISION_START], vision_end_token_id=token_ids[VISION_END],
                            tie_word_embeddings=preset.tie_embeddings)


def build_processor() -> Processor:
    """An offline processor for the random presets: the stock image processor and a word-level tokenizer."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from par_demo.tokenizer import build_word_tokenizer

    specials = [END_OF_TEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_TOKEN]
    tokenizer = build_word_tokenizer(specials, unk=END_OF_TEXT, pad=END_OF_TEXT, eos=IM_END, extra_words=[
        "system", "user", "assistant", "you", "helpful"])
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": DEFAULT_MIN_PIXELS, "longest_edge": DEFAULT_MAX_PIXELS},
        patch_size=14, merge_size=2, temporal_patch_size=2)
    return Processor(image_processor, tokenizer)


class Qwen2_5_VL(Family):
    name = "qwen2.5-vl"
    model_types = ("qwen2_5_vl",)

    @staticmethod
    def model_class():
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def load_processor(self, path, local_files_only):
        return Processor.from_pretrained(path, local_files_only=local_files_only)

    def adopt_processor(self, processor, config):
        return Processor.adopt(processor)

    preset_names = tuple(PRESETS)

    def build_random(self, name):
        processor = build_processor()
        tokenizer = processor.tokenizer
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_TOKEN, VISION_START, VISION_END, IM_END,
                                                                END_OF_TEXT)}
        return build_config(PRESETS[name], ids), processor

    def unquantized_modules(self):
        return ["model.visual", "lm_head"]

    def check_options(self, options):
        unknown = set(options) - {"min_pixels", "max_pixels"}
        if unknown:
            raise UserError(f"{', '.join('--' + k.replace('_', '-') for k in sorted(unknown))}: {self.name} models "
                            f"are not cut into tiles; they take --min-pixels / --max-pixels")
        for key, value in options.items():
            if not isinstance(value, int) or value < 28 * 28:
                raise UserError(f"--{key.replace('_', '-')} must be a whole number of pixels, at least {28 * 28} "
                                f"(one 28 x 28 cell), got {value!r}")
        if options.get("min_pixels", 0) > options.get("max_pixels", float("inf")):
            raise UserError(f"--min-pixels ({options['min_pixels']}) is above --max-pixels ({options['max_pixels']})")

    def check_supported(self, model):
        super().check_supported(model)
        if getattr(model.config.text_config, "use_sliding_window", False):
            raise UserError("Qwen2.5-VL checkpoints with sliding-window attention in the decoder are not supported")

    # ---------------------------------------------------------------------------------------- one query
    def encode(self, loaded, image, question):
        processor = loaded.processor
        images = processor.images(image, loaded.options)
        grid = images["image_grid_thw"]  # (1, 3): temporal, rows, cols of 14-px patches
        merge = processor.image_processor.merge_size
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        if prompt.count(IMAGE_TOKEN) != 1:
            raise UserError("the chat template must place exactly one image")
        prompt = prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * (int(grid.prod()) // merge ** 2))
        input_ids = processor.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        check_prompt_length(input_ids, loaded.config.text_config.max_position_embeddings)
        return {"input_ids": input_ids.to(loaded.device),
                "pixel_values": images["pixel_values"].to(loaded.device, loaded.model.model.visual.dtype),
                "image_grid_thw": grid.to(loaded.device),
                "mm_token_type_ids": (input_ids == loaded.config.image_token_id).int().to(loaded.device)}

    @torch.inference_mode()
    def prepare(self, model, inputs, overview_only=False):  # one view: nothing to leave out
        grid = inputs["image_grid_thw"]
        visual = model.model.visual
        last_full = visual.blocks[max(visual.fullatt_block_indexes)].attn  # the tower has no CLS token: see below
        with recorded_calls(last_full, last_full.qkv) as (attention_calls, qkv_calls):
            features = model.model.get_image_features(inputs["pixel_values"], grid).pooler_output[0]  # (n_v, D)
        width = visual.config.hidden_size
        query_keys = qkv_calls[0].output[:, :2 * width].clone()  # (n_patches, 2d): values are not needed
        dominance = partial(received_attention, query_keys, attention_calls[0].kwargs["position_embeddings"],
                            last_full.num_heads, last_full.scaling, self.window_order(model.config, grid))
        input_ids = inputs["input_ids"]
        embeds, image_positions = embed_with_features(model, input_ids, model.config.image_token_id, features)
        positions, deltas = model.model.get_rope_index(input_ids, inputs["mm_token_type_ids"], image_grid_thw=grid)
        merge = model.config.vision_config.spatial_merge_size
        _, rows, cols = (int(x) for x in grid[0])
        return Query(
            input_ids=input_ids, inputs_embeds=embeds, image_positions=image_positions, image_features=features,
            positions=positions,  # (3, 1, L): temporal, row, column
            next_position=input_ids.shape[1] + int(deltas[0, 0]),  # = max(positions) + 1, as `generate` continues
            layout=Layout.row_major(rows // merge, cols // merge, device=input_ids.device),
            vision_flops=self.vision_flops(model.config, grid),
            dominance=dominance, dominance_flops=2.0 * query_keys.shape[0] ** 2 * width,  # all score rows
        )

    @staticmethod
    def window_order(config, grid_thw: torch.Tensor) -> torch.Tensor:
        """The tower reorders merged tokens window by window; entry i is the merged token at the tower's place i."""
        from transformers.vision_utils import get_vision_window_index

        v = config.vision_config
        window_index, _ = get_vision_window_index(grid_thw.cpu(), v.spatial_merge_size, v.window_size, v.patch_size)
        return window_index

    def model_view(self, loaded, image):
        _, rows, cols = (int(x) for x in loaded.processor.images(image, loaded.options)["image_grid_thw"][0])
        patch = loaded.processor.image_processor.patch_size
        return image.convert("RGB").resize((cols * patch, rows * patch), Image.Resampling.BICUBIC)

    def max_visual_tokens(self, loaded):
        processor = loaded.processor
        return processor.size(loaded.options)["longest_edge"] // (14 * processor.image_processor.merge_size) ** 2

    def describe(self, loaded):
        return "Qwen2.5-VL (dynamic-resolution tower, 2×2 merger, M-RoPE decoder)"

    # ---------------------------------------------------------------------------------------- FLOPs
    @staticmethod
    def vision_flops(config, grid_thw: torch.Tensor) -> float:
        """Patch embedding + blocks (window attention except `fullatt_block_indexes`) + merger, for one image."""
        from transformers.vision_utils import get_vision_window_index

        v = config.vision_config
        n = int(grid_thw.prod())  # 14-px patches
        d, m = v.hidden_size, v.intermediate_size
        _, cu_windows = get_vision_window_index(grid_thw.cpu(), v.spatial_merge_size, v.window_size, v.patch_size)
        windows = (cu_windows[1:] - cu_windows[:-1]).double()
        linear = 2 * n * d * 4 * d + 2 * 3 * n * d * m  # qkv, proj; gated MLP (gate, up, down)
        window_attention = float((2 * 2 * windows ** 2 * d).sum())
        full_attention = 2 * 2 * n * n * d
        n_full = sum(1 for i in range(v.depth) if i in set(v.fullatt_block_indexes))
        blocks = v.depth * linear + n_full * full_attention + (v.depth - n_full) * window_attention
        patch_embed = n * 2 * d * v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        merged = n // v.spatial_merge_size ** 2
        wide = d * v.spatial_merge_size ** 2
        merger = 2 * merged * (wide * wide + wide * v.out_hidden_size)
        return float(patch_embed + blocks + merger)


def received_attention(query_keys: torch.Tensor, position_embeddings, heads: int, scale: float,
                       window_index: torch.Tensor, rows_at_once: int = 1024) -> torch.Tensor:
    """VisionZip's dominance for a tower without a CLS token: the mean softmax attention each merged token receives
    (summed over its 2 x 2 patches, averaged over heads and every query patch) in the tower's last full-attention
    block. Rows of scores are made a few at a time, so the patches x patches matrix never exists whole. -> (n_v,)"""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    n = query_keys.shape[0]
    q, k = query_keys.reshape(n, 2, heads, -1).unbind(1)  # (n, H, hd) each, as the block computed them
    q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
    q, k = q.transpose(0, 1).float(), k.transpose(0, 1).float()  # (H, n, hd)
    received = torch.zeros(heads, n, device=q.device)
    for start in range(0, n, rows_at_once):
        received += torch.softmax(q[:, start:start + rows_at_once] @ k.transpose(1, 2) * scale, dim=-1).sum(1)
    per_patch = received.mean(0) / n
    per_token = per_patch.view(window_index.numel(), -1).sum(1)  # the tower keeps each token's patches together
    return per_token[torch.argsort(window_index.to(per_token.device))]  # back to row-major order
