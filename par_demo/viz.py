"""Plotly figures for the demo: kept/dropped patches, the decoder-layer strip, latencies and the budget sweep.

Every function takes plain Python data (lists, numbers, a PIL image, `timing.Spread`s) and returns a
`plotly.graph_objects.Figure`, so the figures can be built and checked without Gradio or a model.

Titles are short (at most ~40 characters, a second line in a smaller font when more must be said) and legends
sit under the plots, so that every title reads in full on a 390 px wide phone screen.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from PIL import Image

from par_demo.timing import Spread

KEPT_COLOR = "#2e7d32"  # green: layer run / patch kept
SKIPPED_COLOR = "#d62728"  # red: layer skipped (the paper's Figure 4 convention)
FULL_COLOR = "#7f7f7f"  # grey: the unpruned model
PRUNED_COLOR = "#1f77b4"  # blue: the pruned model
DIM_FACTOR = 0.25  # dropped patches keep a quarter of their brightness: visibly off, still recognisable
FONT = dict(family="DejaVu Sans, Arial, sans-serif", size=13)


def _base_layout(fig: go.Figure, title: str, height: int) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, x=0.01, xanchor="left", font=dict(size=15)),
        height=height,
        margin=dict(l=10, r=10, t=50, b=10),
        font=FONT,
        plot_bgcolor="white",
        paper_bgcolor="white",
        # a short toolbar (download, reset): the full one covered the plot's label on a phone; dragging still zooms
        modebar=dict(remove=["zoom", "pan", "select", "lasso", "zoomin", "zoomout", "autoscale"]),
    )
    return fig


def empty_figure(message: str, height: int = 300) -> go.Figure:
    """A blank figure with a centred hint, shown before the first query."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=14, color="#555"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _base_layout(fig, "", height)


def png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def kept_mask(grid: tuple[int, int], kept: Sequence[int]) -> np.ndarray:
    """Boolean (rows, cols) array, True where the patch (row-major index) was kept."""
    rows, cols = grid
    mask = np.zeros(rows * cols, dtype=bool)
    indices = np.asarray(list(kept), dtype=np.int64)
    indices = indices[(indices >= 0) & (indices < rows * cols)]
    mask[indices] = True
    return mask.reshape(rows, cols)


def dim_dropped(image: Image.Image, grid: tuple[int, int], kept: Sequence[int],
                empty: Sequence[int] = ()) -> Image.Image:
    """The image with every dropped patch darkened, so what the model still sees stands out. `empty` cells hold no
    visual token (between a tiled image's views): left as they are."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width = rgb.shape[:2]
    rows, cols = grid
    mask = kept_mask(grid, kept) | kept_mask(grid, empty)
    # Pixel -> patch lookup; works for sizes that are not exact multiples of the grid.
    row_of_pixel = np.minimum(np.arange(height) * rows // height, rows - 1)
    col_of_pixel = np.minimum(np.arange(width) * cols // width, cols - 1)
    pixel_kept = mask[row_of_pixel[:, None], col_of_pixel[None, :]]
    dimmed = np.where(pixel_kept[..., None], rgb, rgb * DIM_FACTOR)
    return Image.fromarray(dimmed.clip(0, 255).astype(np.uint8))


def _grayscale(image: Image.Image) -> Image.Image:
    return image.convert("L").convert("RGB")


def patch_figure(
    image: Image.Image,
    grid: tuple[int, int],
    kept: Sequence[int],
    scores: Sequence[float] | None = None,
    show_scores: bool = False,
    score_name: str = "router score",
    title: str | None = None,
    height: int = 440,
    empty: Sequence[int] = (),
) -> go.Figure:
    """The model-view image with dropped patches dimmed, or (show_scores) a per-patch score heatmap over it.

    Hovering a patch shows its row, column, index, kept/dropped and score in both views. `empty` cells hold no
    visual token (a tiled image's grid has some between its tiles and its global view): neither kept nor dropped.
    """
    rows, cols = grid
    width, height_px = image.size
    cell_w, cell_h = width / cols, height_px / rows
    mask = kept_mask(grid, kept)
    no_token = kept_mask(grid, empty)
    n_kept, n_total = int(mask.sum()), rows * cols - int(no_token.sum())
    has_scores = scores is not None and len(scores) == rows * cols  # one per cell; empty cells' are None
    score_grid = np.asarray(scores, dtype=float).reshape(rows, cols) if has_scores else np.full((rows, cols), np.nan)

    heat_mode = show_scores and has_scores
    background = _grayscale(image) if heat_mode else dim_dropped(image, grid, kept, empty)
    fig = go.Figure(go.Image(source=png_data_uri(background), hoverinfo="skip", x0=0, y0=0, dx=1, dy=1))

    status = np.where(mask, "kept", np.where(no_token, "no visual token here", "dropped"))
    row_idx, col_idx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    customdata = np.stack([row_idx, col_idx, row_idx * cols + col_idx, status, np.round(score_grid, 4)], axis=-1)
    hover = ("patch %{customdata[2]} (row %{customdata[0]}, col %{customdata[1]})<br>%{customdata[3]}"
             + (f"<br>{score_name}: %{{customdata[4]}}" if has_scores else "") + "<extra></extra>")
    centres_x = (np.arange(cols) + 0.5) * cell_w
    centres_y = (np.arange(rows) + 0.5) * cell_h
    if heat_mode:
        heat = go.Heatmap(z=score_grid, x=centres_x, y=centres_y, colorscale="Viridis", opacity=0.6,
                          customdata=customdata, hovertemplate=hover,
                          colorbar=dict(title=dict(text=score_name, side="right"), thickness=14))
    else:
        # Invisible layer on top of the image: it only carries the hover text of each patch.
        transparent = [[0, "rgba(0,0,0,0)"], [1, "rgba(0,0,0,0)"]]
        heat = go.Heatmap(z=mask.astype(float), x=centres_x, y=centres_y, colorscale=transparent, showscale=False,
                          customdata=customdata, hovertemplate=hover)
    fig.add_trace(heat)
    if heat_mode:
        _outline_dropped(fig, mask | no_token, cell_w, cell_h)

    if title is None:
        share = 100.0 * n_kept / max(n_total, 1)
        what = f"{score_name} per patch; × = dropped" if heat_mode else "dropped patches dimmed"
        title = f"Visual tokens: kept {n_kept}/{n_total} ({share:.0f}%)" + subtitle(what)
    fig.update_xaxes(visible=False, range=[0, width], constrain="domain")
    fig.update_yaxes(visible=False, range=[height_px, 0], scaleanchor="x", constrain="domain")
    return _base_layout(fig, title, height)


def _outline_dropped(fig: go.Figure, mask: np.ndarray, cell_w: float, cell_h: float) -> None:
    """Small crosses on dropped patches in heatmap mode, so kept/dropped stays visible under the colours."""
    drop_rows, drop_cols = np.nonzero(~mask)
    if len(drop_rows) == 0:
        return
    fig.add_trace(go.Scatter(
        x=(drop_cols + 0.5) * cell_w, y=(drop_rows + 0.5) * cell_h, mode="markers", hoverinfo="skip",
        marker=dict(symbol="x-thin", size=max(4, min(10, cell_w * 0.5)), line=dict(width=1, color="white")),
        showlegend=False,
    ))


def layer_figure(
    n_layers: int,
    kept_layers: Sequence[int],
    layer_scores: Sequence[float] | None = None,
    score_name: str = "router score",
    height: int = 190,
) -> go.Figure:
    """A strip of decoder layers, one cell each: green = run, red = skipped; scores on hover."""
    kept = set(int(i) for i in kept_layers)
    has_scores = layer_scores is not None and len(layer_scores) == n_layers
    fig = go.Figure()
    for label, color, wanted in (("run", KEPT_COLOR, True), ("skipped", SKIPPED_COLOR, False)):
        layers = [i for i in range(n_layers) if (i in kept) == wanted]
        if not layers:
            continue
        score_text = [f"<br>{score_name}: {layer_scores[i]:.3f}" if has_scores else "" for i in layers]
        fig.add_trace(go.Bar(
            x=layers, y=[1] * len(layers), name=label, marker=dict(color=color, line=dict(color="white", width=1)),
            customdata=score_text,
            hovertemplate="layer %{x}: " + label + "%{customdata}<extra></extra>",
        ))
    n_kept = len([i for i in range(n_layers) if i in kept])
    fig.update_layout(bargap=0.05, barmode="overlay", showlegend=False)  # the title names the colours
    fig.update_xaxes(title_text="decoder layer (0 = first)", range=[-0.5, n_layers - 0.5], showgrid=False,
                     dtick=1 if n_layers <= 32 else 4, tickfont=dict(size=10))
    fig.update_yaxes(visible=False, range=[0, 1])
    title = f"Decoder layers: ran {n_kept}/{n_layers}" + subtitle(f"green = run, red = skipped ({n_layers - n_kept})")
    return _base_layout(fig, title, height)


def subtitle(text: str) -> str:
    """A second title line in a smaller font: the detail that would make the first line too long for a phone."""
    return f"<br><span style='font-size:12px;color:#555'>{text}</span>"


def latency_figure(full: dict, pruned: dict, pruned_label: str = "pruned", height: int = 250) -> go.Figure:
    """Grouped horizontal bars: prefill and total seconds, full model vs pruned model (`predict --json` dicts).

    Bars are medians; the whiskers span the fastest and slowest round when the runs were timed in rounds."""
    stages = ["prefill", "total"]
    fig = go.Figure()
    longest = 0.0
    for label, values, color in (("full model", full, FULL_COLOR), (pruned_label, pruned, PRUNED_COLOR)):
        spreads = [_stage_spread(values, stage) for stage in stages]
        longest = max(longest, *(s.high for s in spreads))
        fig.add_trace(go.Bar(
            y=stages, x=[s.median for s in spreads], name=label, orientation="h", marker_color=color,
            error_x=dict(type="data", symmetric=False, array=[s.high - s.median for s in spreads],
                         arrayminus=[s.median - s.low for s in spreads], color="#333", thickness=1.2, width=4),
            text=[_format_seconds(s.median) for s in spreads], textposition="inside", insidetextanchor="start",
            hovertemplate=label + " %{y}: %{x:.4f} s<extra></extra>",
        ))
    # The legend is anchored to the figure's bottom edge, under the tick labels, so it never covers an axis.
    fig.update_layout(barmode="group", bargap=0.25,
                      legend=dict(orientation="h", x=0, xanchor="left", yref="container", y=0, yanchor="bottom"))
    fig.update_xaxes(range=[0, longest * 1.1 or 1], gridcolor="#eee")
    fig.update_yaxes(autorange="reversed")
    rounds = (pruned.get("timing") or {}).get("rounds")
    detail = f"seconds; medians of {rounds} rounds, whiskers min–max" if rounds else "seconds, lower is faster"
    fig = _base_layout(fig, "Latency" + subtitle(detail), height)
    fig.update_layout(margin=dict(b=55))
    return fig


def _stage_spread(values: dict, stage: str) -> Spread:
    """A stage's median and range from a `predict --json` dict; a run timed once has no range."""
    timing = values.get("timing")
    if timing:
        spread = timing[f"{stage}_s"]
        return Spread(spread["median"], spread["low"], spread["high"])
    seconds = float(values[f"{stage}_s"])
    return Spread(seconds, seconds, seconds)


def _format_seconds(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def sweep_latency_figure(points: Sequence[dict], method_label: str, height: int = 340) -> go.Figure:
    """Prefill and total latency of the pruned model against its FLOPs, one point per budget, whiskers = spread.

    `points` are dicts with flops_ratio, budget, answer, `timing` and `full_timing` (`par_demo.timing.Timing`, the
    full model timed in turns with that point). The full model's lines are the median over the sweep, its band the
    fastest to slowest of its medians along the sweep, so a point at budget 1.0 lands on them within its spread."""
    fig = go.Figure()
    xs = [p["flops_ratio"] for p in points]
    hover = [f"budget {p['budget']:.1f}<br>answer: {p['answer'][:60]}" for p in points]
    for stage, dash in (("prefill", "dot"), ("total", "solid")):
        spreads = [getattr(p["timing"], f"{stage}_s") for p in points]
        fig.add_trace(go.Scatter(
            x=xs, y=[s.median for s in spreads], name=f"{method_label} {stage}", mode="lines+markers",
            line=dict(color=PRUNED_COLOR, dash=dash), customdata=hover,
            error_y=dict(type="data", symmetric=False, array=[s.high - s.median for s in spreads],
                         arrayminus=[s.median - s.low for s in spreads], thickness=1, width=3),
            hovertemplate=f"{method_label} {stage}, " + "FLOPs %{x:.2f}: %{y:.4f} s<br>%{customdata}<extra></extra>"))
        if points:
            full = Spread.of([getattr(p["full_timing"], f"{stage}_s").median for p in points])
            fig.add_hrect(y0=full.low, y1=full.high, fillcolor=FULL_COLOR, opacity=0.15, line_width=0)
            fig.add_trace(go.Scatter(x=[0, 1.05], y=[full.median] * 2, mode="lines", name=f"full model {stage}",
                                     line=dict(color=FULL_COLOR, dash=dash),
                                     hovertemplate=f"full model {stage}: %{{y:.4f}} s<extra></extra>"))
    fig.update_xaxes(title_text="FLOPs (fraction of full)", range=[0, 1.05], gridcolor="#eee")
    fig.update_yaxes(title_text="seconds", rangemode="tozero", gridcolor="#eee")
    # No legend (it would cover the axes on a phone): the subtitle says which line is which.
    fig.update_layout(showlegend=False)
    title = f"{method_label}: latency vs FLOPs" + subtitle("dotted prefill, solid total; grey: full model")
    return _base_layout(fig, title, height)


def sweep_agreement_figure(points: Sequence[dict], method_label: str, height: int = 340) -> go.Figure:
    """Agreement of the pruned answer with the full answer (word-overlap F1, 1 = same) against the measured prefill
    time (fraction of the full model's, timed in turns): the trade a visitor feels. FLOPs are in the hover."""
    fig = go.Figure()
    hover = [f"budget {p['budget']:.1f} · FLOPs {p['flops_ratio']:.2f}<br>answer: {p['answer'][:60]}" for p in points]
    xs = [p["time_ratio"] for p in points]
    fig.add_trace(go.Scatter(x=xs, y=[p["agreement"] for p in points],
                             name="agreement", mode="lines+markers", line=dict(color=KEPT_COLOR), customdata=hover,
                             hovertemplate="prefill time %{x:.2f}: agreement %{y:.2f}<br>%{customdata}<extra></extra>"))
    # a pruned run can be slower than the full model (a method's own work on a tiny model): the axis shows it
    fig.update_xaxes(title_text="measured time (fraction of full)", range=[0, max([1.05, *xs]) + 0.02],
                     gridcolor="#eee")
    fig.update_yaxes(title_text="word-overlap F1", range=[-0.05, 1.05], gridcolor="#eee")
    fig.update_layout(showlegend=False)
    title = f"{method_label}: same answer as the full model?" + subtitle(
        f"{len(points)} budgets run · word overlap, 1 = same")
    return _base_layout(fig, title, height)
