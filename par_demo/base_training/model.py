"""A LLaVA-1.5 in miniature, built from transformers' own configs: CLIP tower, two-layer projector, Llama decoder."""

from __future__ import annotations

import numpy as np
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from par_demo.base_training.config import ModelConfig, grid_of
from par_demo.shapes import IMAGE_SIZE
from par_demo.tokenizer import IMAGE_MEAN, IMAGE_STD


def build_model(mc: ModelConfig, processor) -> LlavaForConditionalGeneration:
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=mc.vision_width, intermediate_size=4 * mc.vision_width, num_hidden_layers=mc.vision_layers,
        num_attention_heads=mc.vision_heads, image_size=IMAGE_SIZE, patch_size=mc.patch_size,
        projection_dim=mc.vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=mc.text_width, intermediate_size=mc.text_mlp,
        num_hidden_layers=mc.text_layers, num_attention_heads=mc.text_heads, num_key_value_heads=mc.text_heads,
        max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_seq_length=grid_of(mc.patch_size) ** 2, tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    gen.do_sample, gen.max_new_tokens = False, 8
    return model


def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """What LLaVA feeds its projector: the last vision layer's hidden states without the CLS token."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def to_pixels(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised [B, 3, H, W]; identical to the processor on 192x192 images."""
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std
