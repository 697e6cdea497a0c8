"""SmolVLM (`Idefics3ForConditionalGeneration`, model_type "idefics3"; SmolVLM2's "smolvlm" is the same design):
SigLIP tower -> pixel-shuffle connector -> Llama decoder, on an image cut into tiles plus a global view.

What differs from LLaVA:
- the image processor resizes the image so its long side is `size["longest_edge"]` (2,048 px for SmolVLM-256M/500M),
  rounds both sides up to whole 512-px tiles and cuts it into rows x cols tiles; a downscaled copy of the whole
  image (the global view) comes last. An image no larger than one tile is not cut: it gives the global view only;
- every view gives (512 / 16)^2 / 4^2 = 64 visual tokens (the connector folds 4 x 4 neighbouring patches into one);
- the prompt marks each tile with `<fake_token_around_image><row_i_col_j>` before its 64 `<image>` tokens and the
  global view with `<global-img>`; the stock `Idefics3Processor` (which needs no video processor) writes it;
- positions are 1-D (0 .. L-1); decoding continues at L.
The tower has no CLS token, so its "dominance" score of a visual token (VisionZip's ranking) is the mean attention
its patches receive from every patch of the same view in the tower's last layer (`received_attention`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from PIL import Image

from par_demo.errors import UserError
from par_demo.families.base import (Family, Layout, Query, chat_template, check_prompt_length, embed_with_features,
                                   fold_patches, read_chat_template, recorded_calls, tiled_view, vit_layer_flops)
from par_demo.families.views import lazy_views, overview_views

IMAGE_TOKEN, FAKE_TOKEN, GLOBAL_TOKEN = "<image>", "<fake_token_around_image>", "<global-img>"
BOS, END_OF_UTTERANCE, END_OF_TEXT = "<|im_start|>", "<end_of_utterance>", "<|endoftext|>"
MAX_MARKER = 6  # the tokenizer knows <row_1_col_1> .. <row_6_col_6>
ROW_COL_TOKENS = [f"<row_{i}_col_{j}>" for i in range(1, MAX_MARKER + 1) for j in range(1, MAX_MARKER + 1)]
# SmolVLM-Instruct's conversation format: "<|im_start|>User:<image>question<end_of_utterance>\nAssistant:"
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{{ ':' if message['content'][0]['type'] == 'image' else ': ' }}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    image_size: int  # one tile (and the global view), px
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    scale_factor: int  # the connector folds scale x scale patches into one visual token
    lm_width: int
    lm_layers: int
    lm_heads: int
    lm_kv_heads: int
    lm_mlp: int
    vocab_size: int
    max_tiles_per_side: int  # size["longest_edge"] = this many tiles


PRESETS: dict[str, Preset] = {
    # SmolVLM-256M-Instruct: SigLIP-B/16 at 512 px (93 M) + SmolLM2-135M (30 x 576, 9 heads, 3 KV heads);
    # 64 tokens per view, the long side cut into up to 4 tiles (2,048 px).
    "smolvlm-256m": Preset(512, 16, 768, 12, 12, 3072, 4, 576, 30, 9, 3, 1536, 49280, 4),
    # SmolVLM-500M-Instruct: the same tower + SmolLM2-360M (32 x 960, 15 heads, 5 KV heads).
    "smolvlm-500m": Preset(512, 16, 768, 12, 12, 3072, 4, 960, 32, 15, 5, 2560, 49280, 4),
    # CPU-sized stand-in with the real 64 tokens per view (256-px tiles, 2 x 2 folding) and a llava-mid-sized decoder
    # (12 x 768): a 3 x 3-tile image gives 640 visual tokens, and the tower is a small share, as in larger SmolVLMs.
    "smolvlm-mid": Preset(256, 16, 256, 4, 4, 1024, 2, 768, 12, 12, 12, 2048, 8192, 3),
    # Tiny, for tests: 64-px tiles of 8-px patches, 2 x 2 folding -> 16 tokens per view; up to 3 tiles per side.
    "smolvlm-tiny": Preset(64, 8, 32, 2, 2, 64, 2, 64, 6, 4, 2, 128, 512, 3),
}


def build_config(preset: Preset, token_ids: dict[str, int]):
    from transformers import Idefics3Config

    vision = dict(hidden_size=preset.vision_width, intermediate_size=preset.vision_mlp,
                  num_hidden_layers=preset.vision_layers, num_attention_heads=preset.vision_heads,
                  image_size=preset.image_size, patch_size=preset.patch_size)
    text = dict(hidden_size=preset.lm_width, intermediate_size=preset.lm_mlp, num_hidden_layers=preset.lm_layers,
                num_attention_heads=preset.lm_heads, num_key_value_heads=preset.lm_kv_heads,
                head_dim=preset.lm_width // preset.lm_heads, vocab_size=preset.vocab_size,
                max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                bos_token_id=token_ids[BOS], eos_token_id=token_ids[END_OF_UTTERANCE],
                pad_token_id=token_ids[END_OF_TEXT])
    return Idefics3Config(vision_config=vision, text_config=text, scale_factor=preset.scale_factor,
                          image_token_id=token_ids[IMAGE_TOKEN])


def tokens_per_view(config) -> int:
    """Visual tokens of one tile or of the global view: (image / patch)^2 patches, folded scale^2 to one."""
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2 // config.scale_factor ** 2


def idefics3_processor(image_processor, tokenizer, template: str | None, config):
    """The stock `Idefics3Processor` over an image processor and tokenizer, for `config`'s views."""
    from transformers import Idefics3Processor

    return Idefics3Processor(image_processor, tokenizer, image_seq_len=tokens_per_view(config),
                             chat_template=chat_template(template, tokenizer, CHAT_TEMPLATE))


def build_processor(preset: Preset):
    """The stock `Idefics3Processor` over the stock (PIL) image processor and an offline word-level tokenizer."""
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from par_demo.tokenizer import build_word_tokenizer

    specials = [END_OF_TEXT, BOS, END_OF_UTTERANCE, IMAGE_TOKEN, FAKE_TOKEN, GLOBAL_TOKEN] + ROW_COL_TOKENS
    tokenizer = build_word_tokenizer(specials, unk=END_OF_TEXT, pad=END_OF_TEXT, eos=END_OF_UTTERANCE,
                                     extra_words=["user", "assistant"], image_token=IMAGE_TOKEN)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": preset.max_tiles_per_side * preset.image_size},
        max_image_size={"longest_edge": preset.image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    seq_len = (preset.image_size // preset.patch_size) ** 2 // preset.scale_factor ** 2
    return Idefics3Processor(image_processor, tokenizer, image_seq_len=seq_len, chat_template=CHAT_TEMPLATE)


class SmolVLM(Family):
    name = "smolvlm"

    def __init__(self, model_type: str = "idefics3"):
        # Two stock classes share this design: Idefics3 (SmolVLM-256M/500M/2B) and SmolVLM (SmolVLM2).
        self.model_types = (model_type,)
        self.preset_names = tuple(PRESETS) if model_type == "idefics3" else ()

    def model_class(self):
        import transformers

        return {"idefics3": transformers.Idefics3ForConditionalGeneration,
                "smolvlm": transformers.SmolVLMForConditionalGeneration}[self.model_types[0]]

    def load_processor(self, path, local_files_only):
        """The stock Idefics3 processor (SmolVLM2's own needs a video processor, which needs torchvision)."""
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=local_files_only)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only, trust_remote_code=False)
        config = AutoConfig.from_pretrained(path, local_files_only=local_files_only, trust_remote_code=False)
        return idefics3_processor(image_processor, tokenizer, read_chat_template(path), config)

    def adopt_processor(self, processor, config):
        """Idefics3's processor writes the prompt this family reads; SmolVLM's own (which needs a video processor)
        is rebuilt as one from its image processor, tokenizer and chat template."""
        from transformers import Idefics3Processor

        if isinstance(processor, Idefics3Processor):
            return processor
        return idefics3_processor(processor.image_processor, processor.tokenizer,
                                  getattr(processor, "chat_template", None), config)

    def build_random(self, name):
        processor = build_processor(PRESETS[name])
        tokenizer = processor.tokenizer
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_TOKEN, BOS, END_OF_UTTERANCE, END_OF_TEXT)}
        return build_config(PRESETS[name], ids), processor

    def unquantized_modules(self):
        return ["model.vision_model", "model.connector", "lm_head"]

    extra_input_names = ("tile_grid",)

    def check_options(self, options):
        unknown = set(options) - {"max_tiles"}
        if unknown:
            raise UserError(f"{', '.join('--' + k.replace('_', '-') for k in sorted(unknown))}: {self.name} models "
                            f"cut images into tiles; they take --max-tiles, not pixel limits")
        tiles = options.get("max_tiles")
        if tiles is not None and (not isinstance(tiles, int) or not 1 <= tiles <= MAX_MARKER ** 2):
            raise UserError(f"--max-tiles must be a whole number from 1 to {MAX_MARKER ** 2}, got {tiles!r}")

    # ---------------------------------------------------------------------------------------- one query
    def image_kwargs(self, processor, options) -> dict:
        """--max-tiles N: the long side is cut into floor(sqrt(N)) tiles at most, so no image gives more than N."""
        if not options.get("max_tiles"):
            return {}
        tile = processor.image_processor.max_image_size["longest_edge"]
        return {"size": {"longest_edge": tile * math.isqrt(options["max_tiles"])}}

    def tile_grid(self, processor, image: Image.Image, options: dict) -> tuple[int, int]:
        """(rows, cols) of tiles the image processor cuts this image into; (0, 0) = not cut (global view only)."""
        out = processor.image_processor(images=image.convert("RGB"), return_row_col_info=True,
                                        **self.image_kwargs(processor, options))
        return int(out["rows"][0][0]), int(out["cols"][0][0])

    def encode(self, loaded, image, question):
        processor = loaded.processor
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        batch = processor(images=[[image.convert("RGB")]], text=prompt, return_tensors="pt",
                          add_special_tokens=False, **self.image_kwargs(processor, loaded.options))
        input_ids = batch["input_ids"]
        check_prompt_length(input_ids, loaded.config.text_config.max_position_embeddings)
        n_views = batch["pixel_values"].shape[1]
        rows, cols = self.grid_from_markers(processor.tokenizer, input_ids) if n_views > 1 else (0, 0)
        if n_views > 1 and rows * cols != n_views - 1:
            raise UserError(f"the prompt marks {rows} x {cols} tiles but the image gives {n_views - 1}")
        dtype = loaded.model.model.vision_model.embeddings.patch_embedding.weight.dtype
        return {"input_ids": input_ids.to(loaded.device),
                "pixel_values": batch["pixel_values"].to(loaded.device, dtype),
                "pixel_attention_mask": batch["pixel_attention_mask"].to(loaded.device),
                "tile_grid": torch.tensor([rows, cols])}

    @staticmethod
    def grid_from_markers(tokenizer, input_ids: torch.Tensor) -> tuple[int, int]:
        """The tiles' (rows, cols), read from the <row_i_col_j> markers the processor wrote into the prompt."""
        present = set(input_ids[0].tolist())
        marked = [(i, j) for i in range(1, MAX_MARKER + 1) for j in range(1, MAX_MARKER + 1)
                  if tokenizer.convert_tokens_to_ids(f"<row_{i}_col_{j}>") in present]
        return max(i for i, _ in marked), max(j for _, j in marked)

    @torch.inference_mode()
    def prepare(self, model, inputs, overview_only=False):
        input_ids = inputs["input_ids"]
        rows, cols = (int(x) for x in inputs["tile_grid"])
        side = math.isqrt(tokens_per_view(model.config))
        layout = (Layout.tiled(rows, cols, (side, side), device=input_ids.device) if rows * cols
                  else Layout.row_major(side, side, device=input_ids.device))
        n_views = inputs["pixel_values"].shape[1]
        views = overview_views(layout) if overview_only and rows * cols else list(range(n_views))
        last = model.model.vision_model.encoder.layers[-1].self_attn
        with recorded_calls(last.q_proj, last.k_proj) as (queries, keys):
            seen = self.view_features(model, inputs, views)
        queries, keys = queries[0].output, keys[0].output  # (views, patches, d): what the last layer computed
        features = seen.new_zeros(n_views * side * side, seen.shape[1])
        features.view(n_views, side * side, -1)[views] = seen.view(len(views), side * side, -1)
        embeds, image_positions = embed_with_features(model, input_ids, model.config.image_token_id, features)
        query = Query(
            input_ids=input_ids, inputs_embeds=embeds, image_positions=image_positions, image_features=features,
            positions=torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0),  # (1, L)
            next_position=input_ids.shape[1], layout=layout,
            vision_flops=self.vision_flops(model.config, n_views), view_flops=self.vision_flops(model.config, 1))
        if len(views) < n_views:
            return lazy_views(query, partial(self.view_features, model, inputs), views, embeds.dtype)
        query.dominance = partial(received_attention, queries, keys, last.num_heads, last.scale,
                                  model.config.scale_factor)
        query.dominance_flops = 2.0 * queries.shape[0] * queries.shape[1] ** 2 * queries.shape[2]
        return query

    @staticmethod
    def view_features(model, inputs: dict, views: list[int]) -> torch.Tensor:
        """Tower + connector on some views -> (len(views) x 64, D), view by view."""
        pixels, mask = inputs["pixel_values"][:, views], inputs["pixel_attention_mask"][:, views]
        return model.model.get_image_features(pixels, mask).pooler_output[0]  # one image: its views' tokens

    def model_view(self, loaded, image):
        rows, cols = self.tile_grid(loaded.processor, image, loaded.options)
        side = math.isqrt(tokens_per_view(loaded.config))
        if rows * cols == 0:  # not cut: the whole image, squeezed to one tile
            return image.convert("RGB").resize((side * 32, side * 32), Image.Resampling.BICUBIC)
        return tiled_view(image, Layout.tiled(rows, cols, (side, side)))

    def max_visual_tokens(self, loaded):
        processor = loaded.processor.image_processor
        tile = processor.max_image_size["longest_edge"]
        size = self.image_kwargs(loaded.processor, loaded.options).get("size", processor.size)
        per_side = max(1, math.ceil(size["longest_edge"] / tile))
        tiles = per_side ** 2 + 1 if per_side > 1 else 1
        return tiles * tokens_per_view(loaded.config)

    def describe(self, loaded):
        return (f"SmolVLM (SigLIP tower, image cut into tiles + a global view of {tokens_per_view(loaded.config)} "
                f"tokens each, pixel-shuffle connector, Llama decoder)")

    # ---------------------------------------------------------------------------------------- FLOPs
    @staticmethod
    def vision_flops(config, n_views: int) -> float:
        """SigLIP tower (no CLS) on every view + the connector's one linear layer (2 FLOPs per multiply-add)."""
        v, d_lm = config.vision_config, config.text_config.hidden_size
        n, d = (v.image_size // v.patch_size) ** 2, v.hidden_size
        per_layer = vit_layer_flops(n, d, v.intermediate_size)
        patch_embed = n * 2 * d * v.num_channels * v.patch_size ** 2
        connector = 2 * n * d * d_lm  # n / s^2 tokens of width d * s^2, projected to the decoder's width
        return float(n_views * (patch_embed + v.num_hidden_layers * per_layer + connector))


def received_attention(queries: torch.Tensor, keys: torch.Tensor, heads: int, scale: float, fold: int,
                       rows_at_once: int = 1024) -> torch.Tensor:
    """VisionZip's dominance for a tower without a CLS token: the mean softmax attention each visual token's patches
    receive (summed over its fold x fold patches, averaged over heads and every query patch of its view) in the
    tower's last layer. Rows of scores are made a few at a time, view by view. -> (n_v,)"""
    views, n, _ = queries.shape
    received = torch.zeros(views, n, device=queries.device)
    for v in range(views):
        q = queries[v].float().view(n, heads, -1).transpose(0, 1)  # (H, n, hd)
        k = keys[v].float().view(n, heads, -1).transpose(0, 1)
        for start in range(0, n, rows_at_once):
            weights = torch.softmax(q[:, start:start + rows_at_once] @ k.transpose(1, 2) * scale, dim=-1)
            received[v] += weights.sum(1).mean(0)
    return fold_patches(received / n, fold)
