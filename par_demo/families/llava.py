"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP tower with a fixed square grid -> MLP projector -> Llama.

What differs from other families: the image is resized and centre-cropped to one square size, so every image
gives the same rows x cols grid (24 x 24 = 576 tokens for LLaVA-1.5-7B); the tower runs up to
`vision_feature_layer` and drops its CLS token; positions are 1-D (0 .. L-1) and decoding continues at L. The
tower's "dominance" score of a patch (VisionZip's ranking) is the CLS token's attention to it at the feature layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from PIL import Image

from par_demo.errors import UserError
from par_demo.families.base import (Family, Layout, Query, check_prompt_length, embed_with_features, recorded_calls,
                                   vit_layer_flops)


@dataclass(frozen=True)
class Preset:
    """Architecture of a random-weight LLaVA: CLIP vision tower -> 2-layer MLP projector -> Llama decoder."""

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
    vision_feature_layer: int = -2


PRESETS: dict[str, Preset] = {
    # LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 image tokens) + Vicuna-7B (32 layers x 4096).
    "llava-1.5-7b": Preset(336, 14, 1024, 24, 16, 4096, 4096, 32, 32, 32, 11008, 32064),
    # CPU-sized stand-in with the same 576 image tokens, for benchmarks on a laptop.
    "llava-mid": Preset(336, 14, 256, 4, 4, 1024, 768, 12, 12, 12, 2048, 8192),
    # Tiny, for tests: 12x12 = 144 image tokens, grouped-query attention, 8 layers.
    "llava-tiny": Preset(96, 8, 32, 2, 2, 64, 128, 8, 4, 2, 256, 512),
}


def build_config(preset: Preset, image_token_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=preset.vision_width, intermediate_size=preset.vision_mlp,
        num_hidden_layers=preset.vision_layers, num_attention_heads=preset.vision_heads,
        image_size=preset.image_size, patch_size=preset.patch_size, projection_dim=preset.vision_width,
    )
    text = LlamaConfig(
        hidden_size=preset.lm_width, intermediate_size=preset.lm_mlp, num_hidden_layers=preset.lm_layers,
        num_attention_heads=preset.lm_heads, num_key_value_heads=preset.lm_kv_heads,
        vocab_size=preset.vocab_size, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        vision_feature_layer=preset.vision_feature_layer, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def tower_layers_run(config) -> int:
    """Vision layers up to the feature layer; the ones after it are never run."""
    layer = config.vision_feature_layer
    return layer if layer >= 0 else config.vision_config.num_hidden_layers + 1 + layer


class Llava(Family):
    name = "llava"
    model_types = ("llava",)

    @staticmethod
    def model_class():
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def load_processor(self, path, local_files_only):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, local_files_only=local_files_only, trust_remote_code=False)

    def adopt_processor(self, processor, config):
        """The stock `LlavaProcessor` as it is (it expands the image token into the model's patch count)."""
        from transformers import LlavaProcessor

        if not isinstance(processor, LlavaProcessor):
            raise UserError(f"a LLaVA model takes its LlavaProcessor (AutoProcessor.from_pretrained), got "
                            f"{type(processor).__name__}")
        return processor

    preset_names = tuple(PRESETS)

    def build_random(self, name):
        from par_demo.tokenizer import build_processor

        preset = PRESETS[name]
        processor = build_processor(image_size=preset.image_size, patch_size=preset.patch_size)
        tokenizer = processor.tokenizer
        config = build_config(preset, tokenizer.convert_tokens_to_ids(processor.image_token))
        config.text_config.eos_token_id = tokenizer.eos_token_id
        return config, processor

    def unquantized_modules(self):
        return ["model.vision_tower", "model.multi_modal_projector", "lm_head"]

    def check_supported(self, model):
        from par_demo.errors import UserError

        super().check_supported(model)
        tower = model.model.vision_tower
        if not (hasattr(tower, "embeddings") and hasattr(tower, "encoder")):
            raise UserError(f"unsupported vision tower {type(tower).__name__}: the llava family runs CLIP-style towers")
        if not isinstance(model.config.vision_feature_layer, int):
            raise UserError("vision towers that concatenate several feature layers are not supported")

    # ---------------------------------------------------------------------------------------- one query
    def encode(self, loaded, image, question):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = loaded.processor.apply_chat_template(conversation, add_generation_prompt=True)
        batch = loaded.processor(images=image.convert("RGB"), text=prompt, return_tensors="pt")
        check_prompt_length(batch["input_ids"], loaded.config.text_config.max_position_embeddings)
        dtype = loaded.model.model.vision_tower.embeddings.patch_embedding.weight.dtype
        return {"input_ids": batch["input_ids"].to(loaded.device),
                "pixel_values": batch["pixel_values"].to(loaded.device, dtype)}

    @torch.inference_mode()
    def prepare(self, model, inputs, overview_only=False):  # one view: nothing to leave out
        n_run = tower_layers_run(model.config)
        attention = model.model.vision_tower.encoder.layers[n_run - 1].self_attn if n_run else None
        watched = (attention.q_proj, attention.k_proj) if attention is not None else ()
        with recorded_calls(*watched) as calls:
            features = self.image_features(model, inputs["pixel_values"])
        dominance, dominance_flops = None, 0.0
        if attention is not None:
            keys = calls[1][0].output[0]  # (n + 1, d): every token's key at the feature layer, CLS first
            cls_query = calls[0][0].output[0, 0].clone()  # (d,): only the CLS row is needed
            drop_cls = model.config.vision_feature_select_strategy == "default"
            dominance = partial(cls_attention, cls_query, keys, attention.num_heads, attention.scale, drop_cls)
            dominance_flops = 2.0 * keys.numel()  # one query row against n + 1 keys, every head
        input_ids = inputs["input_ids"]
        embeds, image_positions = embed_with_features(model, input_ids, model.config.image_token_id, features)
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        return Query(
            input_ids=input_ids, inputs_embeds=embeds, image_positions=image_positions, image_features=features,
            positions=torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0),  # (1, L)
            next_position=input_ids.shape[1],
            layout=Layout.row_major(side, side, device=input_ids.device),
            vision_flops=self.vision_flops(model.config),
            dominance=dominance, dominance_flops=dominance_flops,
        )

    @staticmethod
    def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower up to the feature layer (later layers are never run) -> projector. (n_v, D)."""
        tower = model.model.vision_tower
        h = tower.embeddings(pixel_values.to(tower.embeddings.patch_embedding.weight.dtype))
        if hasattr(tower, "pre_layrnorm"):
            h = tower.pre_layrnorm(h)
        for layer in tower.encoder.layers[:tower_layers_run(model.config)]:
            h = layer(h, attention_mask=None)
            h = h[0] if isinstance(h, tuple) else h
        if model.config.vision_feature_select_strategy == "default":
            h = h[:, 1:]  # drop CLS
        return model.model.multi_modal_projector(h)[0]

    def model_view(self, loaded, image):
        proc = loaded.processor.image_processor
        pixels = proc(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        mean = torch.tensor(proc.image_mean).view(3, 1, 1)
        std = torch.tensor(proc.image_std).view(3, 1, 1)
        array = ((pixels * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(array)

    def max_visual_tokens(self, loaded):
        vision = loaded.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def describe(self, loaded):
        side = loaded.config.vision_config.image_size // loaded.config.vision_config.patch_size
        return f"LLaVA (CLIP tower, fixed {side}×{side} grid, Llama decoder)"

    # ---------------------------------------------------------------------------------------- FLOPs
    @staticmethod
    def vision_flops(config) -> float:
        """CLIP tower up to its feature layer + the 2-layer projector (2 FLOPs per multiply-add)."""
        v, d_lm = config.vision_config, config.text_config.hidden_size
        n_patches = (v.image_size // v.patch_size) ** 2
        n, d = n_patches + 1, v.hidden_size  # + CLS
        per_layer = vit_layer_flops(n, d, v.intermediate_size)
        patch_embed = n_patches * 2 * d * v.num_channels * v.patch_size ** 2
        n_out = n_patches if config.vision_feature_select_strategy == "default" else n
        projector = 2 * n_out * (d * d_lm + d_lm * d_lm)
        return float(patch_embed + tower_layers_run(config) * per_layer + projector)


def cls_attention(cls_query: torch.Tensor, keys: torch.Tensor, heads: int, scale: float, drop_cls: bool):
    """VisionZip's dominance: the CLS token's softmax attention over every token at the feature layer, averaged over
    heads. Only the CLS row is computed, from the query and keys the tower produced while it ran. -> (n_v,)"""
    q = cls_query.float().view(heads, 1, -1)  # (H, 1, hd)
    k = keys.float().view(keys.shape[0], heads, -1).transpose(0, 1)  # (H, n + 1, hd)
    weights = torch.softmax((q @ k.transpose(1, 2)).squeeze(1) * scale, dim=-1)  # (H, n + 1)
    scores = weights.mean(0)
    return scores[1:] if drop_cls else scores
