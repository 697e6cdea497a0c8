"""InternVL3 (`InternVLForConditionalGeneration`, the `-hf` checkpoints): InternViT -> pixel shuffle + MLP -> Qwen2.

What differs from LLaVA:
- the image is cut into tiles of 448 x 448 px: among the rows x cols arrangements of 1 to `max_patches` (12) tiles,
  the one whose aspect ratio is closest to the image's; the image is resized to exactly that many tiles, cut, and a
  448-px thumbnail of the whole image comes last (no thumbnail when one tile is chosen);
- every view gives (448 / 14)^2 / 4 = 256 visual tokens (pixel shuffle folds 2 x 2 patches into one), CLS dropped;
- the prompt holds `<img>` + 256 x views `<IMG_CONTEXT>` + `</img>`; the stock processor needs a video processor
  (torchvision), so inputs are made from the image processor and the tokenizer exactly as it would;
- positions are 1-D (0 .. L-1); decoding continues at L. The decoder is Qwen2 (biases on q, k, v).
The tower's "dominance" score of a visual token (VisionZip's ranking) is its view's CLS attention to its 2 x 2
patches at the feature layer, the same score LLaVA's family gives, view by view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from PIL import Image

from par_demo.errors import UserError
from par_demo.families.base import (Family, ImageTextProcessor, Layout, Query, check_prompt_length, embed_with_features,
                                   fold_patches, recorded_calls, tiled_view, vit_layer_flops)
from par_demo.families.views import lazy_views, overview_views
from par_demo.families.llava import cls_attention

IMAGE_TOKEN, IMAGE_START, IMAGE_END = "<IMG_CONTEXT>", "<img>", "</img>"
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# InternVL3-hf's conversation format (system turn, the image block on its own line, then the question).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Processor(ImageTextProcessor):
    """Image processor (GotOcr2's, cropping to tiles) + tokenizer + chat template: what `InternVLProcessor` holds."""

    image_token = IMAGE_TOKEN
    default_chat_template = CHAT_TEMPLATE

    def max_tiles(self, options: dict) -> int:
        return int(options.get("max_tiles") or self.image_processor.max_patches)

    def tile_grid(self, image: Image.Image, options: dict) -> tuple[int, int]:
        """(rows, cols) of tiles this image is cut into; (1, 1) = one view, no thumbnail."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        proc, tiles = self.image_processor, self.max_tiles(options)
        if not proc.crop_to_patches or tiles <= 1:
            return 1, 1
        size = (proc.size["height"], proc.size["width"])
        cols, rows = get_optimal_tiled_canvas((image.height, image.width), size, proc.min_patches, tiles)
        return rows, cols

    def images(self, image: Image.Image, options: dict) -> dict:
        return self.image_processor(images=image.convert("RGB"), return_tensors="pt",
                                    max_patches=self.max_tiles(options))


@dataclass(frozen=True)
class Preset:
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    lm_width: int
    lm_layers: int
    lm_heads: int
    lm_kv_heads: int
    lm_mlp: int
    vocab_size: int
    max_tiles: int
    tie_embeddings: bool = False


PRESETS: dict[str, Preset] = {
    # InternVL3-2B-hf and -8B-hf: InternViT-300M (24 x 1024 at 448 px, 14-px patches) and Qwen2.5 decoders of
    # 28 x 1536 and 28 x 3584; 256 tokens per view, 1 to 12 tiles + a thumbnail.
    "internvl3-2b": Preset(448, 14, 1024, 24, 16, 4096, 1536, 28, 12, 2, 8960, 151674, 12, True),
    "internvl3-8b": Preset(448, 14, 1024, 24, 16, 4096, 3584, 28, 28, 4, 18944, 151674, 12),
    # Tiny, for tests: 56-px tiles of 7-px patches -> 16 tokens per view; up to 6 tiles.
    "internvl3-tiny": Preset(56, 7, 32, 2, 2, 64, 64, 6, 4, 2, 128, 512, 6),
}


def build_config(preset: Preset, token_ids: dict[str, int]):
    from transformers import InternVLConfig

    vision = dict(hidden_size=preset.vision_width, num_hidden_layers=preset.vision_layers,
                  num_attention_heads=preset.vision_heads, intermediate_size=preset.vision_mlp,
                  image_size=preset.image_size, patch_size=preset.patch_size)
    text = dict(model_type="qwen2", hidden_size=preset.lm_width, num_hidden_layers=preset.lm_layers,
                num_attention_heads=preset.lm_heads, num_key_value_heads=preset.lm_kv_heads,
                intermediate_size=preset.lm_mlp, vocab_size=preset.vocab_size, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                bos_token_id=None, eos_token_id=token_ids[IM_END], pad_token_id=token_ids[END_OF_TEXT])
    seq = (preset.image_size // preset.patch_size) ** 2 // 4
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=token_ids[IMAGE_TOKEN],
                          image_seq_length=seq, tie_word_embeddings=preset.tie_embeddings)


def build_processor(preset: Preset) -> Processor:
    """An offline processor for the random presets: the stock (PIL) image processor and a word-level tokenizer."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from par_demo.tokenizer import build_word_tokenizer

    specials = [END_OF_TEXT, IM_START, IM_END, IMAGE_START, IMAGE_END, IMAGE_TOKEN]
    tokenizer = build_word_tokenizer(specials, unk=END_OF_TEXT, pad=END_OF_TEXT, eos=IM_END, extra_words=[
        "system", "user", "assistant", "you", "helpful"])
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": preset.image_size, "width": preset.image_size}, crop_to_patches=True, min_patches=1,
        max_patches=preset.max_tiles, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return Processor(image_processor, tokenizer)


def tokens_per_view(config) -> int:
    v = config.vision_config
    return int((v.image_size[0] // v.patch_size[0]) * (v.image_size[1] // v.patch_size[1])
               * config.downsample_ratio ** 2)


class InternVL(Family):
    name = "internvl"
    model_types = ("internvl",)

    @staticmethod
    def model_class():
        from transformers import InternVLForConditionalGeneration

        return InternVLForConditionalGeneration

    def load_processor(self, path, local_files_only):
        return Processor.from_pretrained(path, local_files_only=local_files_only)

    def adopt_processor(self, processor, config):
        return Processor.adopt(processor)

    preset_names = tuple(PRESETS)
    extra_input_names = ("tile_grid",)

    def build_random(self, name):
        processor = build_processor(PRESETS[name])
        tokenizer = processor.tokenizer
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_TOKEN, IM_END, END_OF_TEXT)}
        return build_config(PRESETS[name], ids), processor

    def unquantized_modules(self):
        return ["model.vision_tower", "model.multi_modal_projector", "lm_head"]

    def check_options(self, options):
        unknown = set(options) - {"max_tiles"}
        if unknown:
            raise UserError(f"{', '.join('--' + k.replace('_', '-') for k in sorted(unknown))}: {self.name} models "
                            f"cut images into tiles; they take --max-tiles, not pixel limits")
        tiles = options.get("max_tiles")
        if tiles is not None and (not isinstance(tiles, int) or not 1 <= tiles <= 40):
            raise UserError(f"--max-tiles must be a whole number from 1 to 40, got {tiles!r}")

    def check_supported(self, model):
        super().check_supported(model)
        if not isinstance(model.config.vision_feature_layer, int):
            raise UserError("vision towers that concatenate several feature layers are not supported")
        if getattr(model.config.text_config, "use_sliding_window", False):
            raise UserError("InternVL checkpoints with sliding-window attention in the decoder are not supported")

    # ---------------------------------------------------------------------------------------- one query
    def encode(self, loaded, image, question):
        processor = loaded.processor
        image = image.convert("RGB")
        images = processor.images(image, loaded.options)
        n_views = int(images["num_patches"][0])
        rows, cols = processor.tile_grid(image, loaded.options)
        if n_views != (rows * cols + 1 if rows * cols > 1 else 1):
            raise UserError(f"the image processor gave {n_views} views for {rows} x {cols} tiles")
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        if prompt.count(IMAGE_TOKEN) != 1:
            raise UserError("the chat template must place exactly one image")
        block = IMAGE_START + IMAGE_TOKEN * (tokens_per_view(loaded.config) * n_views) + IMAGE_END
        prompt = prompt.replace(IMAGE_TOKEN, block)
        input_ids = processor.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        check_prompt_length(input_ids, loaded.config.text_config.max_position_embeddings)
        dtype = loaded.model.model.vision_tower.embeddings.patch_embeddings.projection.weight.dtype
        return {"input_ids": input_ids.to(loaded.device),
                "pixel_values": images["pixel_values"].to(loaded.device, dtype),
                "tile_grid": torch.tensor([rows, cols])}

    @torch.inference_mode()
    def prepare(self, model, inputs, overview_only=False):
        config = model.config
        input_ids = inputs["input_ids"]
        rows, cols = (int(x) for x in inputs["tile_grid"])
        side = math.isqrt(tokens_per_view(config))
        layout = (Layout.tiled(rows, cols, (side, side), device=input_ids.device) if rows * cols > 1
                  else Layout.row_major(side, side, device=input_ids.device))
        n_views = inputs["pixel_values"].shape[0]
        views = overview_views(layout) if overview_only and rows * cols > 1 else list(range(n_views))
        layers = model.model.vision_tower.encoder.layer
        feature_layer = config.vision_feature_layer
        attention = layers[feature_layer if feature_layer < 0 else feature_layer - 1].attention
        with recorded_calls(attention.q_norm, attention.k_norm) as (queries, keys):  # q, k as the heads get them
            seen = self.view_features(model, inputs, views)
        features = seen.new_zeros(n_views * side * side, seen.shape[1])
        features.view(n_views, side * side, -1)[views] = seen.view(len(views), side * side, -1)
        embeds, image_positions = embed_with_features(model, input_ids, config.image_token_id, features)
        query = Query(
            input_ids=input_ids, inputs_embeds=embeds, image_positions=image_positions, image_features=features,
            positions=torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0),  # (1, L)
            next_position=input_ids.shape[1], layout=layout,
            vision_flops=self.vision_flops(config, n_views), view_flops=self.vision_flops(config, 1))
        if len(views) < n_views:
            return lazy_views(query, partial(self.view_features, model, inputs), views, embeds.dtype)
        cls_queries = queries[0].output[:, 0].clone()  # (views, d): only the CLS rows are needed
        keys = keys[0].output  # (views, 1 + patches, d)
        query.dominance = partial(view_cls_attention, cls_queries, keys, attention.num_heads, attention.scale,
                                  int(1 / config.downsample_ratio))
        query.dominance_flops = 2.0 * keys.numel()  # one query row per view against its keys
        return query

    @staticmethod
    def view_features(model, inputs: dict, views: list[int]) -> torch.Tensor:
        """Tower + pixel shuffle + projector on some views -> (len(views) x 256, D), view by view."""
        config = model.config
        features = model.model.get_image_features(
            inputs["pixel_values"][views], vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy).pooler_output
        return features.reshape(-1, features.shape[-1])

    def model_view(self, loaded, image):
        rows, cols = loaded.processor.tile_grid(image, loaded.options)
        side = math.isqrt(tokens_per_view(loaded.config))
        if rows * cols == 1:  # one view: the whole image, squeezed to one tile
            return image.convert("RGB").resize((side * 28, side * 28), Image.Resampling.BICUBIC)
        return tiled_view(image, Layout.tiled(rows, cols, (side, side)))

    def max_visual_tokens(self, loaded):
        tiles = loaded.processor.max_tiles(loaded.options)
        return (tiles + 1 if tiles > 1 else 1) * tokens_per_view(loaded.config)

    def describe(self, loaded):
        return (f"InternVL3 (InternViT tower, image cut into tiles + a thumbnail of {tokens_per_view(loaded.config)} "
                f"tokens each, pixel-shuffle projector, Qwen2 decoder)")

    # ---------------------------------------------------------------------------------------- FLOPs
    @staticmethod
    def vision_flops(config, n_views: int) -> float:
        """InternViT (CLS + patches, every layer runs) on every view + the pixel-shuffle projector's two layers."""
        v, d_lm = config.vision_config, config.text_config.hidden_size
        patches = (v.image_size[0] // v.patch_size[0]) * (v.image_size[1] // v.patch_size[1])
        n, d = patches + 1, v.hidden_size
        per_layer = vit_layer_flops(n, d, v.intermediate_size)
        patch_embed = patches * 2 * d * v.num_channels * v.patch_size[0] * v.patch_size[1]
        folded = int(1 / config.downsample_ratio) ** 2
        n_out = tokens_per_view(config)
        projector = 2 * n_out * (d * folded * d_lm + d_lm * d_lm)
        return float(n_views * (patch_embed + v.num_hidden_layers * per_layer + projector))


def view_cls_attention(cls_queries: torch.Tensor, keys: torch.Tensor, heads: int, scale: float, fold: int):
    """Each view's CLS attention over its patches (LLaVA's score), summed over the patches folded into each visual
    token; views in order. -> (n_v,)"""
    per_patch = torch.stack([cls_attention(q, k, heads, scale, drop_cls=True) for q, k in zip(cls_queries, keys)])
    return fold_patches(per_patch, fold)
