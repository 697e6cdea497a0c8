"""What a model family must tell the engine: the one seam between par-demo and a model architecture.

The engine, the FLOPs model, the methods, the router and the app know nothing about LLaVA or Qwen. They work on a
`Query`: the prompt embeddings with the visual features in place, where the visual tokens sit, each one's
(row, column) in its image grid, the rotary position ids of every prompt token and of the first generated one, and
the FLOPs the vision path spent. A family (one small file in this folder) produces it from (image, question):

    inputs   = family.encode(loaded, image, question)        # processor side: token ids, pixels, grid
    query    = family.prepare(loaded.model, inputs)          # vision path + embeddings + positions
    view     = family.model_view(loaded, image)              # the image as the model saw it (for the patch grid)

plus the few facts the loader and the decoder loop need (`check_supported`, presets, FLOPs of the vision path).
A query may also carry how much the vision tower attends to each visual token (`Query.dominance`, what VisionZip
ranks by), computed on demand from the queries and keys the tower produced while it ran (`recorded_calls`).
Everything else in a family is the stock transformers model; a family never copies a layer.
"""

from __future__ import annotations

import copy
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageDraw

from par_demo.errors import UserError
from par_demo.flops import Shape


@dataclass(frozen=True)
class Tile:
    """One view of a tiled image: a tile (a crop of the resized image) or the global view (the whole image, small).

    Tiled families (SmolVLM, InternVL3) cut a large image into tiles and add a global view; each view gives its own
    grid of visual tokens. The patch view draws every tile at its place on the image and the global view beside it."""

    box: tuple[float, float, float, float]  # (top, left, bottom, right) of the original image it shows, fractions
    origin: tuple[int, int]  # (row, col) of its top-left cell in the patch view's grid
    grid: tuple[int, int]  # its own rows x cols of visual tokens
    name: str  # for people: "tile 2,3", "global view"


@dataclass
class Layout:
    """Where each visual token comes from in the image: its (row, column) cell in the rows x cols grid the patch view
    draws, and, for tiled images, its tile.

    Visual tokens are listed in the order they sit in the sequence; for the families here that is row-major (tile
    by tile for tiled images), but nothing relies on it: every consumer reads `rows`/`cols`, or `centres()` for the
    token's place on the original image (which is what the router is told: the same for a tile token and for the
    global view's token at the same spot).
    """

    rows: torch.Tensor  # (n_v,) long
    cols: torch.Tensor  # (n_v,) long
    grid: tuple[int, int]  # (rows, cols) of the patch view's grid
    tile: torch.Tensor | None = None  # (n_v,) long: index into `tiles`; None for an untiled image
    tiles: tuple[Tile, ...] = ()

    @classmethod
    def row_major(cls, n_rows: int, n_cols: int, device=None) -> "Layout":
        index = torch.arange(n_rows * n_cols, device=device)
        return cls(index // n_cols, index % n_cols, (int(n_rows), int(n_cols)))

    @classmethod
    def tiled(cls, tile_rows: int, tile_cols: int, tokens: tuple[int, int], device=None) -> "Layout":
        """An image cut into tile_rows x tile_cols tiles followed by its global view, each `tokens` = (rows, cols)
        visual tokens in row-major order, tiles row by row (the order SmolVLM and InternVL3 put them in).

        The patch view's grid holds the tiles at their places and, one empty column to their right, the global
        view; tile (i, j) shows rows i / tile_rows .. (i + 1) / tile_rows of the image (the image is resized to
        whole tiles, so the tiles cover it exactly)."""
        n_r, n_c = tokens
        tiles = [Tile((i / tile_rows, j / tile_cols, (i + 1) / tile_rows, (j + 1) / tile_cols), (i * n_r, j * n_c),
                      (n_r, n_c), f"tile {i + 1},{j + 1}") for i in range(tile_rows) for j in range(tile_cols)]
        tiles.append(Tile((0.0, 0.0, 1.0, 1.0), (0, tile_cols * n_c + 1), (n_r, n_c), "global view"))
        cell = torch.arange(n_r * n_c, device=device)
        rows = torch.cat([t.origin[0] + cell // n_c for t in tiles])
        cols = torch.cat([t.origin[1] + cell % n_c for t in tiles])
        tile = torch.arange(len(tiles), device=device).repeat_interleave(n_r * n_c)
        grid = (max(tile_rows, 1) * n_r, (tile_cols + 1) * n_c + 1)
        return cls(rows, cols, grid, tile, tuple(tiles))

    @property
    def n_visual(self) -> int:
        return self.rows.numel()

    def subset(self, index: torch.Tensor) -> "Layout":
        """The layout of some of the visual tokens (in the given order), on the same grid and tiles."""
        return Layout(self.rows[index], self.cols[index], self.grid,
                      None if self.tile is None else self.tile[index], self.tiles)

    def same_places(self, other: "Layout") -> bool:
        """Every visual token at the same place as in `other` (same grid, cells and tiles)."""
        if self is other:
            return True
        return (self.grid == other.grid and self.tiles == other.tiles and torch.equal(self.rows, other.rows)
                and torch.equal(self.cols, other.cols) and (self.tile is None) == (other.tile is None)
                and (self.tile is None or torch.equal(self.tile, other.tile)))

    def patch_indices(self, kept: torch.Tensor | list[int]) -> list[int]:
        """Row-major cell indices (row * cols + col) of the given visual tokens: what the patch view draws."""
        kept = torch.as_tensor(kept, dtype=torch.long, device=self.rows.device)
        return (self.rows[kept] * self.grid[1] + self.cols[kept]).tolist()

    def views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Each token's view (0 for an untiled image; else its tile, the global view last) and its (row, col) inside
        that view, and the views' own grid (every tile and the global view have the same one)."""
        if self.tile is None:
            return torch.zeros_like(self.rows), self.rows, self.cols, self.grid
        origin = torch.tensor([t.origin for t in self.tiles], device=self.rows.device)[self.tile]
        return self.tile, self.rows - origin[:, 0], self.cols - origin[:, 1], self.tiles[0].grid

    def empty_cells(self) -> list[int]:
        """Cells of the grid that hold no visual token (a tiled image's, around the global view); row-major."""
        taken = torch.zeros(self.grid[0] * self.grid[1], dtype=torch.bool)
        taken[self.patch_indices(torch.arange(self.n_visual))] = True
        return (~taken).nonzero().squeeze(1).tolist()

    def centres(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, x) of each visual token's cell centre on the original image, in [0, 1]."""
        if self.tile is None:
            return (self.rows.float() + 0.5) / self.grid[0], (self.cols.float() + 0.5) / self.grid[1]
        device = self.rows.device
        box = torch.tensor([t.box for t in self.tiles], device=device)[self.tile]  # (n_v, 4)
        origin = torch.tensor([t.origin for t in self.tiles], device=device)[self.tile]  # (n_v, 2)
        size = torch.tensor([t.grid for t in self.tiles], device=device)[self.tile].float()  # (n_v, 2)
        y = box[:, 0] + (self.rows - origin[:, 0] + 0.5) / size[:, 0] * (box[:, 2] - box[:, 0])
        x = box[:, 1] + (self.cols - origin[:, 1] + 0.5) / size[:, 1] * (box[:, 3] - box[:, 1])
        return y, x


def tiled_view(image: Image.Image, layout: Layout, cell_px: int | None = None) -> Image.Image:
    """The patch view's picture of a tiled image: each tile's part of the image at the tile's place in the grid, on a
    white background (the column between the tiles and the global view stays empty). Cells are `cell_px` wide
    (default: about 800 px across in all)."""
    rows, cols = layout.grid
    cell = cell_px or max(8, 800 // cols)
    canvas = Image.new("RGB", (cols * cell, rows * cell), "white")
    image = image.convert("RGB")
    width, height = image.size
    draw = ImageDraw.Draw(canvas)
    for tile in layout.tiles:
        top, left, bottom, right = tile.box
        crop = image.crop((round(left * width), round(top * height), round(right * width), round(bottom * height)))
        size = (tile.grid[1] * cell, tile.grid[0] * cell)
        x, y = tile.origin[1] * cell, tile.origin[0] * cell
        canvas.paste(crop.resize(size, Image.Resampling.BICUBIC), (x, y))
        draw.rectangle((x, y, x + size[0] - 1, y + size[1] - 1), outline=(255, 255, 255))  # where a tile ends
    return canvas


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
    # How much the vision tower itself attends to each visual token (VisionZip's "dominant" tokens), computed on demand
    # from what the tower kept of its own run, and what computing it costs. None where the family gives none.
    dominance: Callable[[], torch.Tensor] | None = None  # -> (n_v,), higher = more attended
    dominance_flops: float = 0.0
    # Tiled images, prepared with the overview only (`Family.prepare(..., overview_only=True)`): the tower has run on
    # the global view / thumbnail alone, and a method that routes views asks for more with `encode_views`, which
    # runs the tower on those views and writes their features into this query in place. Tokens of views never
    # encoded hold zeros and must leave the sequence before the first layer (`Engine.validate_plan` checks).
    encoded: torch.Tensor | None = None  # (n_v,) bool: the tower has run on this token's view; None: on every view
    encode_views: Callable[[list[int]], None] | None = None  # view indices (`layout.tiles`) -> features in place
    view_flops: float = 0.0  # the vision path's cost of one view (tiled images; `vision_flops` is every view's)
    # A query cut down to some of its visual tokens before any layer (`restrict`): the whole image's counts, which
    # the full model's FLOPs and every budget are measured against.
    whole: Shape | None = None

    @property
    def n_visual(self) -> int:
        return self.image_positions.numel()

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def n_text(self) -> int:
        return self.length - self.n_visual

    @property
    def partial(self) -> bool:
        """The tower has not run on every view of this image (yet)."""
        return self.encoded is not None and not bool(self.encoded.all())


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

    def adopt_processor(self, processor, config):
        """The processor `encode` reads, from the one a user loaded with transformers (`par_demo.wrap`): the stock
        processor as it is, unless this family reads another one (see `load_processor`)."""
        return processor

    preset_names: tuple[str, ...] = ()  # `random:<name>` presets: the exact architecture, random weights
    # Keys `encode` adds for `prepare` that the stock model does not take (a tiled image's tile grid).
    extra_input_names: tuple[str, ...] = ()

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
            raise UserError(f"{names}: {self.name} models resize every image to one size; only dynamic-resolution "
                            f"models (qwen2.5-vl) take pixel limits, only tiled ones (smolvlm, internvl) --max-tiles")

    # ---- one query
    def encode(self, loaded, image: Image.Image, question: str) -> dict:
        """(image, question) -> model inputs on the model's device, exactly as the stock processor makes them.

        `loaded.options` holds per-model image options (Qwen2.5-VL: min_pixels / max_pixels; tiled: max_tiles)."""
        raise NotImplementedError

    def stock_inputs(self, inputs: dict, extra_tokens: tuple[int, ...] | list[int] = ()) -> dict:
        """`encode`'s inputs as the stock model's `generate` / forward takes them, with `extra_tokens` (generated
        text) appended to the prompt."""
        stock = {k: v for k, v in inputs.items() if k not in self.extra_input_names}
        if extra_tokens:
            extra = torch.tensor([list(extra_tokens)], device=inputs["input_ids"].device)
            stock["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
            if "mm_token_type_ids" in inputs:  # Qwen2.5-VL: 0 marks a text token
                stock["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"],
                                                        torch.zeros_like(extra).to(inputs["mm_token_type_ids"])], 1)
        stock["attention_mask"] = torch.ones_like(stock["input_ids"])
        return stock

    def prepare(self, model, inputs: dict, overview_only: bool = False) -> Query:
        """`overview_only`: for a tiled image, run the tower on the global view / thumbnail alone and return a query
        that encodes the other views on demand (`Query.encode_views`); untiled images ignore it."""
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


def chat_template(multimodal: str | None, tokenizer, default: str) -> str:
    """The template prompts are written with: the processor's own (multimodal) one, else the tokenizer's, else the
    family's default (a checkpoint saved without one)."""
    return multimodal or tokenizer.chat_template or default


def read_chat_template(folder) -> str | None:
    """The multimodal chat template a hub checkpoint keeps in `chat_template.json`, if it has one."""
    path = Path(folder) / "chat_template.json"
    return json.loads(path.read_text())["chat_template"] if path.is_file() else None


class ImageTextProcessor:
    """Image processor + tokenizer + chat template: what a stock processor holds, for families whose stock processor
    cannot be built here (it needs a video processor, which needs torchvision). Subclasses name their image token and
    the chat template a checkpoint without one gets."""

    image_token = ""
    default_chat_template = ""

    def __init__(self, image_processor, tokenizer):
        self.image_processor, self.tokenizer = image_processor, tokenizer

    def save_pretrained(self, folder) -> None:
        self.image_processor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    @classmethod
    def adopt(cls, processor) -> "ImageTextProcessor":
        """This class around a stock processor's image processor and tokenizer (and its chat template, which the
        stock processor keeps apart from the tokenizer's)."""
        if isinstance(processor, cls):
            return processor
        tokenizer = copy.copy(processor.tokenizer)  # the caller's tokenizer keeps its own template
        tokenizer.chat_template = chat_template(getattr(processor, "chat_template", None), tokenizer,
                                                cls.default_chat_template)
        return cls(processor.image_processor, tokenizer)

    @classmethod
    def from_pretrained(cls, folder, local_files_only: bool = True):
        from transformers import AutoImageProcessor, AutoTokenizer

        image_processor = AutoImageProcessor.from_pretrained(folder, local_files_only=local_files_only)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=local_files_only, trust_remote_code=False)
        tokenizer.chat_template = chat_template(read_chat_template(folder), tokenizer, cls.default_chat_template)
        return cls(image_processor, tokenizer)


def vit_layer_flops(n: int, width: int, mlp: int) -> float:
    """One ViT encoder layer over n tokens: q, k, v, o projections, scores and weighted values, a 2-layer MLP
    (2 FLOPs per multiply-add)."""
    return 2 * n * width * width * 4 + 2 * 2 * n * n * width + 2 * 2 * n * width * mlp


def language_model(model):
    """The decoder stack (`embed_tokens`, `layers`, `norm`, `rotary_emb`) of a transformers 5 VLM (Idefics3 and
    SmolVLM call it `text_model`)."""
    inner = model.model
    return inner.language_model if hasattr(inner, "language_model") else inner.text_model


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


def fold_patches(per_patch: torch.Tensor, scale: int) -> torch.Tensor:
    """(views, P * P) per-patch values -> (views * (P / scale)^2,) per visual token, summed over the scale x scale
    patches pixel shuffle folds into each token, in the tokens' order (view by view, row-major)."""
    views, n = per_patch.shape
    side = math.isqrt(n)
    blocks = per_patch.view(views, side // scale, scale, side // scale, scale)
    return blocks.sum(dim=(2, 4)).reshape(-1)


def check_prompt_length(input_ids: torch.Tensor, context: int) -> None:
    if input_ids.shape[1] > context:
        raise UserError(f"the prompt is {input_ids.shape[1]} tokens long; this model reads at most {context}")


@dataclass
class Call:
    """One recorded call of a module: what it was given and what it returned."""

    args: tuple
    kwargs: dict
    output: object


@contextmanager
def recorded_calls(*modules):
    """Record each module's calls while the block runs: what a vision tower computes anyway (an attention layer's
    queries and keys) is kept instead of being computed again. Yields one list of `Call`s per module."""
    calls: list[list[Call]] = [[] for _ in modules]

    def recorder(store):
        return lambda _module, args, kwargs, output: store.append(Call(args, kwargs, output))

    handles = [m.register_forward_hook(recorder(store), with_kwargs=True) for m, store in zip(modules, calls)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()
