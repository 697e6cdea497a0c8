"""The PAR meta-router: one small bidirectional transformer that scores visual tokens and decoder layers.

Inputs (for one query):
  - the projected visual tokens  (n_v, D)   what the LM would see of the image
  - their places in the image    (n_v, 16)  2-D sinusoids of each token's (row, column) centre, scaled to [0, 1],
                                            so one router takes any number of tokens on any grid (square or not)
  - the question's text embeddings (n_t, D) embed_tokens of the prompt's non-image tokens
  - N learnable layer tokens      (N, W)    one per decoder layer
  - a budget embedding            (W,)      added to every token, so one router serves every budget
Everything is projected from the LM width D down to a small router width W, mixed by a few bidirectional
(unmasked) attention blocks, so visual tokens see the question and each other, and read out as one keep logit
per visual token and one run logit per layer.

With `pool` p > 1, each p x p square of neighbouring cells of a view enters the blocks as one token (the mean of its
visual tokens): the blocks' attention then costs about 1/p**4 of what it did and the rest 1/p**2. Each visual token is
read out from its own embedding plus what the blocks added to its square, so tokens of one square still get their own
logits. Why: on the embedded model (576 visual tokens, router width 16) the router's pass was 1.2 ms of a 10 ms
prefill at time budget 0.25, its attention over 600 tokens half of it, and every millisecond of it comes out of
every time budget.

The router is deliberately tiny: its FLOPs count against every budget (`MetaRouter.flops`).
A checkpoint is `router.safetensors` (weights) + `router.json` (config, the model fingerprint, the Pareto table).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from par_demo.errors import UserError, first_line

WEIGHTS_FILE = "router.safetensors"
CONFIG_FILE = "router.json"
FORMAT_VERSION = 2  # 2: positions from (row, column) for any grid; 1 had one learned vector per patch


@dataclass
class RouterConfig:
    lm_width: int  # D of the language model (visual tokens are already projected to it)
    n_layers: int  # N decoder layers = N layer tokens
    width: int = 32  # W: small on purpose (see `auto_width`)
    depth: int = 2
    heads: int = 2
    mlp_ratio: int = 2
    protected_first: int = 1  # layers 0 .. protected_first-1 always run
    protected_last: int = 1  # the last protected_last layers always run
    start_layer: int = 2  # K: the layer from which dropped visual tokens leave the sequence
    # How kept tokens follow from the token scores: "top" = the T best-scored; "dpp" = a diverse set weighted by the
    # scores (greedy DPP, as CDPruner with the router's scores as the relevance; see methods/par.py `select_tokens`)
    token_selection: str = "top"
    # Dropped tokens absorbed by their look-alikes with proportional attention (methods/absorb.py), in the flows
    # and the Pareto table as at inference. Routers saved before it existed load with False.
    absorb: bool = False
    # p: the blocks see one token per p x p square of neighbouring visual tokens (module docstring); 1 = one each
    pool: int = 1
    model: dict = field(default_factory=dict)  # fingerprint of the model this router belongs to

    def protected(self) -> list[int]:
        first = list(range(min(self.protected_first, self.n_layers)))
        last = list(range(max(self.n_layers - self.protected_last, 0), self.n_layers))
        return sorted(set(first + last))

    def routable(self) -> list[int]:
        """Layers the router may skip."""
        protected = set(self.protected())
        return [i for i in range(self.n_layers) if i not in protected]


# ------------------------------------------------------------------------------------------------ model
class Block(nn.Module):
    """Pre-norm transformer block without a causal mask: every token attends to every token."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, n, W)
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, heads, n, W/heads), bidirectional
        x = x + self.proj(o.transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.norm2(x))


POSITION_FREQUENCIES = 4  # sin/cos at pi, 2 pi, 4 pi, 8 pi per axis: 16 features, a cell is told from its neighbours


def position_features(layout) -> torch.Tensor:
    """(n_v, 16) features of each visual token's cell centre, in [0, 1] along rows and columns of its grid.

    Relative coordinates make the same place of an image look the same to the router on a 12 x 12, a 24 x 24 or a
    tall 30 x 18 grid, which a learned table per patch cannot do."""
    y, x = layout.centres()  # tiled images: the place on the whole image, so a tile and the global view agree
    freqs = math.pi * 2.0 ** torch.arange(POSITION_FREQUENCIES, device=y.device)
    angles = torch.cat([y[:, None] * freqs, x[:, None] * freqs], dim=1)  # (n_v, 8)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def router_cells(layout, pool: int) -> tuple[torch.Tensor, int]:
    """(n_v,) the router token of each visual token and how many there are: the p x p squares of neighbouring cells
    of each view (a tile or the global view), numbered in (view, row, column) order; p = 1: one per token."""
    n_v = layout.n_visual
    if pool == 1:
        return torch.arange(n_v, device=layout.rows.device), n_v
    view, row, col, (rows, cols) = layout.views()
    down, across = -(-rows // pool), -(-cols // pool)  # squares per view, a partial one at the edges
    square = (view * down + row // pool) * across + col // pool
    squares, cell = torch.unique(square, return_inverse=True)
    return cell, squares.numel()


def budget_features(budgets: torch.Tensor) -> torch.Tensor:
    """(B,) budgets in (0, 1] -> (B, 8) smooth features, so nearby budgets get nearby embeddings."""
    b = budgets.float().unsqueeze(1)
    freqs = torch.tensor([1.0, 2.0, 4.0], device=b.device) * math.pi
    return torch.cat([b, b.log(), torch.sin(b * freqs), torch.cos(b * freqs)], dim=1)


class MetaRouter(nn.Module):
    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.down = nn.Linear(config.lm_width, w, bias=False)  # shared by visual and text tokens
        self.input_norm = nn.LayerNorm(config.lm_width)  # visual and text embeddings live at different scales
        self.kind = nn.Parameter(torch.zeros(3, w))  # type embedding: 0 visual, 1 text, 2 layer
        self.position = nn.Linear(4 * POSITION_FREQUENCIES, w)
        self.layer_tokens = nn.Parameter(torch.randn(config.n_layers, w) * 0.02)
        self.budget = nn.Sequential(nn.Linear(8, w), nn.GELU(), nn.Linear(w, w))
        self.blocks = nn.ModuleList(Block(w, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.norm = nn.LayerNorm(w)
        self.token_head = nn.Linear(w, 1)
        self.layer_head = nn.Linear(w, 1)
        nn.init.normal_(self.position.weight, std=0.02)
        nn.init.zeros_(self.position.bias)
        self._parts_cache: list[tuple] = []  # `query_free_parts` without gradients: (key, layout, parts), newest first
        self._cells: tuple | None = None  # (layout, its number of router tokens) of the last `flops` call

    def forward(self, visual: torch.Tensor, text: torch.Tensor, budgets: torch.Tensor, layout):
        """visual (n_v, D), text (n_t, D), budgets (B,), layout (each visual token's row and column)
        -> token logits (B, n_v), layer logits (B, N).

        One forward scores the same query at several budgets (they share everything but the budget embedding).
        """
        cfg = self.config
        n_v, n_t, n_l = visual.shape[0], text.shape[0], cfg.n_layers
        dtype = self.down.weight.dtype
        visual_add, layer_rows, budget_rows, cell, sizes = self.query_free_parts(layout, budgets, visual.device)
        embedded = self.down(self.input_norm(torch.cat([visual, text], dim=0).to(dtype)))  # (n_v + n_t, W)
        tokens = embedded[:n_v] + visual_add  # (n_v, W)
        squares = tokens if cfg.pool == 1 else tokens.new_zeros(sizes.shape[0], tokens.shape[1]).index_add(
            0, cell, tokens) / sizes  # (n_c, W): each square's mean token
        n_c = squares.shape[0]
        x = torch.cat([squares, embedded[n_v:] + self.kind[1], layer_rows], dim=0)  # (n, W)
        x = x.unsqueeze(0) + budget_rows  # (B, n, W)
        for block in self.blocks:
            x = block(x)
        # pooled: each visual token is its own embedding plus what the blocks added to its square
        visual_out = x[:, :n_v] if cfg.pool == 1 else x[:, cell] + (tokens - squares[cell])  # (B, n_v, W)
        token_logits = self.token_head(self.norm(visual_out)).squeeze(-1)  # (B, n_v)
        layer_logits = self.layer_head(self.norm(x[:, n_c + n_t:])).squeeze(-1)  # (B, N)
        assert layer_logits.shape[1] == n_l
        return token_logits, layer_logits

    def query_free_parts(self, layout, budgets: torch.Tensor, device) -> tuple[torch.Tensor, ...]:
        """What the forward adds that depends on no query's features: the visual tokens' type and place (n_v, W),
        the layer tokens (N, W), the budget embedding (B, 1, W), each visual token's square (n_v,) and the squares'
        token counts (n_c, 1) (`router_cells`).

        Without gradients (inference, validation) they are kept for the last few layouts and budgets asked, and
        made again when a weight they come from changed (its in-place version moves with every optimizer step and
        every load). Why: made afresh they were a third of the router's time on the default model (its sinusoids
        and its budget MLP are a dozen small calls: 0.45 of 1.5 ms per query, right after the full model's prefill),
        and that time comes out of every time budget."""
        if torch.is_grad_enabled():
            return self._query_free_parts(layout, budgets, device)
        weights = (self.position.weight, self.position.bias, self.kind, self.layer_tokens, *self.budget.parameters())
        key = (tuple((w.data_ptr(), w._version) for w in weights), str(device), tuple(budgets.tolist()))
        for cached_key, cached_layout, parts in self._parts_cache:
            if cached_key == key and cached_layout.same_places(layout):
                return parts
        parts = self._query_free_parts(layout, budgets, device)
        self._parts_cache = [(key, layout, parts), *self._parts_cache[:7]]
        return parts

    def _query_free_parts(self, layout, budgets: torch.Tensor, device) -> tuple[torch.Tensor, ...]:
        dtype = self.down.weight.dtype
        visual_add = self.position(position_features(layout).to(device, dtype)) + self.kind[0]  # (n_v, W)
        layer_rows = self.layer_tokens + self.kind[2]  # (N, W)
        budget_rows = self.budget(budget_features(budgets.to(device))).to(dtype).unsqueeze(1)  # (B, 1, W)
        cell, n_cells = router_cells(layout, self.config.pool)
        cell = cell.to(device)
        sizes = torch.bincount(cell, minlength=n_cells).to(dtype).unsqueeze(1)  # (n_c, 1)
        return visual_add, layer_rows, budget_rows, cell, sizes

    # ------------------------------------------------------------------------------------------ FLOPs
    def flops(self, layout, n_text: int) -> float:
        """One forward's FLOPs for the visual tokens of `layout` (their squares are counted once per layout object:
        a budget search asks many times)."""
        if self._cells is None or self._cells[0] is not layout:
            self._cells = (layout, router_cells(layout, self.config.pool)[1])
        return router_flops(self.config, layout.n_visual, n_text, self._cells[1])


def router_flops(config: RouterConfig, n_visual: int, n_text: int, n_cells: int | None = None) -> float:
    """Matrix-product FLOPs of one router forward at one budget (2 per multiply-add, like `FlopsModel`). `n_cells`:
    the router tokens the visual ones make (`router_cells`; n_visual when every token is its own)."""
    n_cells = n_visual if n_cells is None else n_cells
    w, n = config.width, n_cells + n_text + config.n_layers
    down = 2 * (n_visual + n_text) * config.lm_width * w + 2 * n_visual * 4 * POSITION_FREQUENCIES * w
    per_block = 2 * n * w * 3 * w + 2 * n * w * w + 2 * 2 * n * n * w + 2 * 2 * n * w * config.mlp_ratio * w
    heads = 2 * (n_visual + config.n_layers) * w
    return float(down + config.depth * per_block + heads)


def auto_width(lm_width: int, n_layers: int, n_visual: int, n_text: int, full_flops: float,
               share: float = 0.01, depth: int = 2, mlp_ratio: int = 2, n_cells: int | None = None) -> int:
    """The widest router (of 128, 96, 64, 48, 32, 16) whose FLOPs stay within `share` of the full prefill."""
    for width in (128, 96, 64, 48, 32, 16):
        cfg = RouterConfig(lm_width, n_layers, width=width, depth=depth, mlp_ratio=mlp_ratio)
        if router_flops(cfg, n_visual, n_text, n_cells) <= share * full_flops:
            return width
    return 16


# ------------------------------------------------------------------------------------------------ models
def sanitize(name: str) -> str:
    """A model name as a folder name: local folders by their base name, hub ids and presets with '_'."""
    path = Path(name)
    if path.exists():
        name = path.resolve().name
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "model"


def fingerprint(loaded) -> dict:
    """What must match between a router and a model: architecture facts, plus a soft check of the weights."""
    config = loaded.config
    text = config.text_config
    # A retrained model keeps its architecture but not its weights; two statistics tell them apart (compared with
    # a tolerance that the dtype's rounding stays inside: `same_weights`). Checked softly: see `check_model`.
    weight = loaded.model.lm_head.weight.detach().float()
    return {
        "name": sanitize(loaded.name),
        "n_layers": int(text.num_hidden_layers),
        "lm_width": int(text.hidden_size),
        "vocab": int(text.vocab_size),
        "weights": f"{weight.mean().item():.3e}/{weight.std().item():.3e}",
    }


def same_weights(want: dict, have: dict) -> bool:
    """Whether two fingerprints' LM-head "mean/std" can come from the same weights loaded in different dtypes (a
    router trained on a GPU in bf16 serving the fp32 model on a CPU). Rounding to bf16 moves each weight by ~0.1 %
    of the std, so the mean by ~0.001 std/sqrt(N) for N weights; two independent draws differ in mean by ~1.4
    std/sqrt(N). The mean is therefore compared at 0.05 std/sqrt(N), the std (stored to 4 digits) at 0.1 %."""
    try:
        (mean_a, std_a), (mean_b, std_b) = ((float(x) for x in f["weights"].split("/")) for f in (want, have))
        n = int(have["vocab"]) * int(have["lm_width"])
    except (KeyError, TypeError, ValueError):
        return want.get("weights") == have.get("weights")
    scale = max(abs(std_a), abs(std_b), 1e-12)
    return abs(mean_a - mean_b) <= 0.05 * scale / math.sqrt(n) and abs(std_a - std_b) <= 1e-3 * scale


def check_model(config: RouterConfig, loaded, where: str = "") -> None:
    """Refuse a router built for another model (architecture); warn if the weights look retrained."""
    have = fingerprint(loaded)
    want = config.model
    hard = ("name", "n_layers", "lm_width", "vocab")
    diff = [f"{k}: router {want.get(k)!r} vs model {have[k]!r}" for k in hard if want.get(k) != have[k]]
    if diff:
        raise UserError(f"the router{where} was trained for another model ({'; '.join(diff)}); "
                        f"train one for this model with: python -m par_demo train-router --model {loaded.name} "
                        f"--images PHOTO_FOLDER --out OUT")
    if want.get("weights") and not same_weights(want, have):
        warnings.warn(f"the router{where} was trained on different weights of {have['name']} "
                      f"(was the model retrained?); its choices may be poor until it is retrained", stacklevel=2)


# ------------------------------------------------------------------------------------------------ files
def save_router(router: MetaRouter, folder, pareto: list[dict] | None = None, extra: dict | None = None) -> Path:
    """Write router.safetensors + router.json into `folder` (created). Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in router.state_dict().items()}
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(folder / WEIGHTS_FILE)  # never leave a half-written checkpoint behind
    meta = {"format": FORMAT_VERSION, "config": asdict(router.config), "pareto": pareto or []}
    meta.update(extra or {})
    tmp = folder / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(folder / CONFIG_FILE)
    return folder


def read_meta(folder) -> dict:
    path = Path(folder) / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise UserError(f"the router in {folder} has format {meta.get('format')}, this version reads format "
                            f"{FORMAT_VERSION} (positions for any grid); retrain it with: python -m par_demo "
                            f"train-router")
        meta["config"] = RouterConfig(**meta["config"])
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"no router in {folder} (expected {CONFIG_FILE} and {WEIGHTS_FILE})") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a router config ({exc.__class__.__name__}: {exc})") from None
    return meta


def load_router(folder, loaded=None, device=None) -> tuple[MetaRouter, dict]:
    """(router in eval mode, meta with 'config' and 'pareto'). With `loaded`, refuses a router for another model."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_meta(folder)
    config = meta["config"]
    if loaded is not None:
        check_model(config, loaded, f" in {folder}")
    if not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"no router weights in {folder} (expected {WEIGHTS_FILE})")
    router = MetaRouter(config)
    try:
        router.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    except (RuntimeError, OSError) as exc:
        raise UserError(f"cannot load router weights from {folder}: {first_line(exc)}") from None
    if device is not None:
        router = router.to(device)
    return router.eval(), meta
