"""Downsampling: the visual tokens average-pooled over the image grid to a coarser grid, before the language model.

The "no method" baseline that benchmark papers (VTC-Bench) find stronger than many published ones. The rows x cols
grid of visual tokens is cut into r' x c' blocks of (nearly) equal size, each block's tokens are averaged into one
token (as the language model receives them, after the connector, as LLaVA-OneVision pools its video frames), and
that token sits at the position of the block's centre cell (the top-left of the middle four when the block has an
even side), so M-RoPE gives it the block's middle row and column. The budget picks the finest grid that fits: every
r' from the full rows down to 1, with c' within one column of the image's aspect ratio, so counts come in fine steps.

A tiled image (SmolVLM, InternVL3) is pooled view by view: every tile and the global view to the same coarser grid.
For a dynamic-resolution model (Qwen2.5-VL) the other way to downsample is to give the tower fewer pixels
(`--max-pixels`), which shrinks the tower's work too; that is a model option and applies to every method alike.
Pooling is additions only: no matrix products, so no FLOPs are charged (as `flops.py` counts).
"""

from __future__ import annotations

import torch

from par_demo.errors import UserError
from par_demo.methods.base import PreLLMMethod, Selection, Setting, check_count


def pooled_grids(rows: int, cols: int) -> dict[int, tuple[int, int]]:
    """Token count -> the pooled (rows, cols) grid that gives it, closest to the image's aspect ratio."""
    grids: dict[int, tuple[int, int]] = {}
    for r in range(1, rows + 1):
        ideal = r * cols / rows
        for c in {round(ideal) - 1, round(ideal), round(ideal) + 1}:
            if 1 <= c <= cols:
                count = r * c
                best = grids.get(count)
                if best is None or abs(c / r - cols / rows) < abs(best[1] / best[0] - cols / rows):
                    grids[count] = (r, c)
    return grids


def blocks(size: int, parts: int) -> torch.Tensor:
    """Which of `parts` nearly equal blocks each of `size` cells is in; block i = [i s // p, (i + 1) s // p)."""
    starts = torch.tensor([i * size // parts for i in range(parts)])
    return torch.searchsorted(starts, torch.arange(size), right=True) - 1


def view_counts(layout) -> dict[int, tuple[int, int]]:
    """Token count -> the pooled grid of each view that gives it. A tiled image pools every tile and its global view
    alike, so counts come in multiples of the views; an untiled image is one view."""
    view, _, _, grid = layout.views()
    n_views = int(view.max()) + 1
    return {count * n_views: pooled for count, pooled in pooled_grids(*grid).items()}


class Downsample(PreLLMMethod):
    name = "downsample"
    extra = "baseline"

    def candidates(self, query, start_layer):
        counts = sorted(view_counts(query.layout), reverse=True)
        return [Setting(t, frozenset(), start_layer) for t in counts if t <= query.n_visual]

    def fixed(self, query, tokens, layers, start_layer):
        wanted = check_count(tokens, 0, query.n_visual, "tokens kept")
        fitting = [t for t in view_counts(query.layout) if t <= wanted]
        if not fitting:
            raise UserError("downsample keeps at least one pooled token")
        return Setting(max(fitting), frozenset(), start_layer)

    def select(self, query, tokens):
        layout, features = query.layout, query.image_features
        view, rows_in, cols_in, (rows, cols) = layout.views()
        n_views = int(view.max()) + 1
        if layout.n_visual != n_views * rows * cols:
            raise UserError("downsample needs a visual token in every cell of the image grid")
        out_rows, out_cols = view_counts(layout)[tokens]
        per_view = out_rows * out_cols
        row_block, col_block = blocks(rows, out_rows), blocks(cols, out_cols)
        device = features.device
        view, rows_in, cols_in = view.cpu(), rows_in.cpu(), cols_in.cpu()
        block = (view * per_view + row_block[rows_in] * out_cols + col_block[cols_in]).to(device)  # per token
        sums = torch.zeros(tokens, features.shape[1], device=device).index_add_(0, block, features.float())
        counts = torch.bincount(block, minlength=tokens).clamp_min(1)
        # the centre cell of each block: middle row of its rows, middle column of its columns
        middle_row = torch.tensor([(r * rows // out_rows + ((r + 1) * rows // out_rows) - 1) // 2
                                   for r in range(out_rows)])
        middle_col = torch.tensor([(c * cols // out_cols + ((c + 1) * cols // out_cols) - 1) // 2
                                   for c in range(out_cols)])
        cell_token = torch.full((n_views, rows, cols), -1, dtype=torch.long)
        cell_token[view, rows_in, cols_in] = torch.arange(layout.n_visual)
        keep = cell_token[:, middle_row[:, None], middle_col[None, :]].reshape(-1)  # block order, like `block`
        return Selection(keep, (sums / counts[:, None]).to(features.dtype))
