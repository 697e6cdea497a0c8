"""What a model family must tell the engine: the one seam between par-demo and a model architecture.

The engine, the FLOPs model, the methods, the router and the app know nothing about LLaVA or Qwen. They work on a
`Query`: the prompt embeddings with the visual features in place, where the visual tokens sit, each one's
(row, column) in its image grid, the rotary position ids of every prompt token and of the first generated one, and
the FLOPs the vision path spent. A family (one small file in this folder) produces it from (image, question):

    inputs   = family.encode(loaded, image, question)        # processor side: token ids, pixels, grid
    query    = family.prepare(loaded.model, inputs)          # vision path + embeddings + positions
    view     = family.model_view(loaded, image)              # the image as the model saw it (for the patch grid)

plus the few facts the loader and the decoder loop need (`check_supported`, presets, FLOPs of the vision path).
Everything else in a family is the stock transformers model; a family never copies a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from par_demo.errors import UserError


@dataclass
class Layout:
    """Where each visual token comes from in the image: its (row, column) in a rows x cols grid of image cells.

    Visual tokens are listed in the order they sit in the sequence; for the families here that is row-major, but
    nothing relies on it: every consumer (router positions, patch view) reads `rows`/`cols`.
    """

    rows: torch.Tensor  # (n_v,) long
    cols: torch.Tensor  # (n_v,) long
    grid: tuple[int, int]  # (rows, cols) of the image grid

    @classmethod
    def row_major(cls, n_rows: int, n_cols: int, device=None) -> "Layout":
        index = torch.arange(n_rows * n_cols, device=device)
        return cls(index // n_cols, index % n_cols, (int(n_rows), int(n_cols)))

    @property
    def n_visual(self) -> int:
        return self.rows.numel()

    def patch_indices(self, kept: torch.Tensor | list[int]) -> list[int]:
        """Row-major cell indices (row * cols + col) of the given visual tokens: what the patch view draws."""
        kept = torch.as_tensor(kept, dtype=torch.long, device=self.rows.device)
        return (self.rows[kept] * self.grid[1] + self.cols[kept]).tolist()


@dataclass
class Query:
    """One query ready for the decoder: what a family hands to the engine."""

    input_ids: torch.Tensor  # (1, L)
    inputs_embeds: torch.Tensor  # (1, L, D) with the visual features in place
    image_positions: torch.Tensor  # (n_v,) indices of the visual tokens in the sequence
    image_features: torch.Tensor  # (n_v, D) visual tokens as the LM sees them
    positions: torch.Tensor  # (1, L) for 1-D RoPE, (3, 1, L) for M-RoPE: what the rotary module takes
    next_position: int  # position of the first generated token; decode step i uses next_position + i
    layout: Layout
    vision_flops: float  # vision tower + connector for this image (images of different sizes cost differently)

    @property
    def n_visual(self) -> int:
        return self.image_positions.numel()

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def n_text(self) -> int:
        return self.length - self.n_visual


class Family:
    """Subclasses say only what differs between model families."""

    name = "family"  # short id, shown to users
    model_types: tuple[str, ...] = ()  # `config.model_type` values this family runs

    # ---- loading
    @staticmethod
    def model_class():
        """The stock transformers class of the whole model."""
        raise NotImplementedError

    def load_processor(self, path: str, local_files_only: bool):
        raise NotImplementedError

    preset_names: tuple[str, ...] = ()  # `random:<name>` presets: the exact architecture, random weights

    def build_random(self, name: str):
        """(config, processor) of a preset; the loader makes the model from the config, no download."""
        raise NotImplementedError

    def unquantized_modules(self) -> list[str]:
        """Modules kept in full precision when the decoder is quantized (vision path and LM head)."""
        return ["lm_head"]

    def check_supported(self, model) -> None:
        """Refuse (UserError) what the decoder loop cannot run exactly."""
        for layer in language_model(model).layers:
            attn = getattr(layer, "self_attn", None)
            parts = ("q_proj", "k_proj", "v_proj", "o_proj")
            if attn is None or not all(hasattr(attn, p) for p in parts) or hasattr(attn, "q_norm"):
                raise UserError(f"unsupported decoder layer {type(layer).__name__}: the engine runs Llama-style layers")

    def check_options(self, options: dict) -> None:
        """Refuse image options this family has no use for (a fixed-size family resizes every image alike)."""
        if options:
            names = ", ".join("--" + key.replace("_", "-") for key in options)
            raise UserError(f"{names}: {self.name} models resize every image to one size; "
                            f"only dynamic-resolution models (qwen2.5-vl) take pixel limits")

    # ---- one query
    def encode(self, loaded, image: Image.Image, question: str) -> dict:
        """(image, question) -> model inputs on the model's device, exactly as the stock processor makes them.

        `loaded.options` holds per-model image options (Qwen2.5-VL: min_pixels / max_pixels)."""
        raise NotImplementedError

    def prepare(self, model, inputs: dict) -> Query:
        raise NotImplementedError

    def model_view(self, loaded, image: Image.Image) -> Image.Image:
        """The image as the vision tower saw it (resized / cropped), aligned with the layout's grid."""
        raise NotImplementedError

    def max_visual_tokens(self, loaded) -> int:
        """The most visual tokens one image can give (the app's token slider goes this far)."""
        raise NotImplementedError

    def describe(self, loaded) -> str:
        """One line for people: the architecture in words."""
        return self.name


def language_model(model):
    """The decoder stack (`embed_tokens`, `layers`, `norm`, `rotary_emb`) of a transformers 5 VLM."""
    return model.model.language_model


def embed_with_features(model, input_ids: torch.Tensor, image_token_id: int, features: torch.Tensor):
    """Prompt embeddings with the visual features written at the image-token positions: (embeds, positions)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise UserError("the engine runs one query at a time (batch size 1)")
    image_positions = (input_ids[0] == image_token_id).nonzero().squeeze(1)
    if image_positions.numel() != features.shape[0]:
        raise UserError(f"the prompt has {image_positions.numel()} image tokens but the image gives "
                        f"{features.shape[0]} features")
    embeds = language_model(model).embed_tokens(input_ids)
    embeds[0, image_positions] = features.to(embeds.dtype)
    return embeds, image_positions


def check_prompt_length(input_ids: torch.Tensor, context: int) -> None:
    if input_ids.shape[1] > context:
        raise UserError(f"the prompt is {input_ids.shape[1]} tokens long; this model reads at most {context}")
