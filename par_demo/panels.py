"""The page's text: timing lines, the stats table, the sweep table, the model card and the all-methods grid.

Plain functions from results to Markdown (or, for the grid, HTML with the classes styled by `CSS`), so what the
page says is testable without a browser. Figures are `par_demo.viz`'s.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from par_demo import viz
from par_demo.inputs import METHOD_LABELS
from par_demo.timing import Spread, Timing

if TYPE_CHECKING:
    from par_demo.model_card import ModelCard
    from par_demo.predict import Prediction
    from par_demo.service import AllMethods

UNSTEADY_NOTE = ("⚠ unsteady: its timing rounds differ by more than 3× and disagree on whether it was faster at all, "
                 "so the machine's load changed while it was timed. Run again for a steadier figure.")
NOISE_NOTE = ("⚠ noise: this speed-up is above what the saved FLOPs allow by more than its measured spread, so the "
              "machine was busy while it was timed; it is not a result. Run again for a fair figure.")
THUMBNAIL_SIDE = 160  # px: the all-methods grid's patch views stay small enough for two columns on a phone


def seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def spread_seconds(spread: Spread) -> str:
    """'21 ms (19–24)': the median and, in brackets, the fastest and slowest round."""
    if spread.high < 1:
        return f"{spread.median * 1000:.0f} ms ({spread.low * 1000:.0f}–{spread.high * 1000:.0f})"
    return f"{spread.median:.2f} s ({spread.low:.2f}–{spread.high:.2f})"


def speedup_text(timing: Timing, stage: str = "prefill") -> str:
    """'1.93× faster (1.8–2.1)' for a timed pruned run; noise is named as such, never shown as a result."""
    spread = timing.prefill_speedup if stage == "prefill" else timing.total_speedup
    figures = f"{spread.median:.2f}× ({spread.low:.2f}–{spread.high:.2f})"
    if stage == "prefill" and timing.noise:
        return f"⚠ {figures}: noise"
    if stage == "prefill" and timing.unsteady:
        return f"⚠ {figures}: unsteady"
    # Tiny models on a busy CPU can come out slower; say so rather than print "0.9× faster".
    return f"{figures} faster" if spread.median >= 1 else f"{figures}, slower this time"


def timing_notes(timings) -> list[str]:
    """The notes a table of timings needs once: noise above the FLOPs bound, rounds that disagree."""
    timings = list(timings)
    return [note for note, flagged in ((NOISE_NOTE, any(t.noise for t in timings)),
                                       (UNSTEADY_NOTE, any(t.unsteady for t in timings))) if flagged]


def display_answer(answer: str) -> str:
    """The answer as shown in the UI; an empty one is said so (random-weight models often produce nothing)."""
    return answer if answer.strip() else "(no text: the model produced only special tokens)"


def timing_markdown(prediction: Prediction, cached: bool = False) -> str:
    """Prefill and total latency with their spread; for a pruned run also its speed-up and the FLOPs bound."""
    t = prediction.timing
    if t is None:  # not timed against anything: one run
        return f"prefill **{seconds(prediction.prefill_s)}** · total **{seconds(prediction.total_s)}**"
    if t.prefill_speedup is None:  # the full model, the reference
        note = " · answer from cache, timed now" if cached else ""
        return (f"prefill **{spread_seconds(t.prefill_s)}** · total **{spread_seconds(t.total_s)}** · "
                f"{prediction.new_tokens} new tokens · medians of {t.rounds} rounds, in turns with the pruned "
                f"model{note}")
    line = (f"prefill **{spread_seconds(t.prefill_s)}**, **{speedup_text(t)}** (FLOPs allow "
            f"{t.speedup_bound:.2f}×) · total **{spread_seconds(t.total_s)}**, {speedup_text(t, 'total')} · "
            f"{prediction.new_tokens} new tokens")
    return line + (f"  \n{NOISE_NOTE}" if t.noise else f"  \n{UNSTEADY_NOTE}" if t.unsteady else "")


# Shown next to the kept tokens when a method absorbed the dropped ones (PAR, cdpruner-absorb): what that means.
ABSORBED_NOTE = " · the dropped ones absorbed into their look-alikes (they keep their share of the attention)"


def views_note(pruned: Prediction) -> str:
    """What a tiled image's tower skipped, when it skipped views (PAR drops tiles before the tower runs)."""
    if pruned.views_encoded >= pruned.views:
        return ""
    return (f" · the vision tower ran on {pruned.views_encoded} of {pruned.views} views (the global view and the "
            f"tiles the router kept)")


def stats_markdown(pruned: Prediction) -> str:
    """FLOPs, visual tokens and layers kept, as a short table."""
    tokens = len(pruned.kept_visual_tokens)
    layers = len(pruned.kept_layers)
    # With time budgets: the cost model's prediction, next to the FLOPs (the measured time is in the timing panel)
    timed = pruned.time_ratio is not None
    return (
        "| FLOPs (prefill) |" + (" predicted time |" if timed else "") + " visual tokens kept | decoder layers run |\n"
        + "|---|" + ("---|" if timed else "") + "---|---|\n"
        f"| **{pruned.flops_ratio:.0%}** of full ({pruned.flops / 1e9:.3g} / {pruned.flops_full / 1e9:.3g} GFLOPs) "
        + (f"| **{pruned.time_ratio:.0%}** of full " if timed else "")
        + f"| **{tokens}** / {pruned.n_visual_tokens} ({tokens / max(pruned.n_visual_tokens, 1):.0%})"
        f"{ABSORBED_NOTE if pruned.absorbed else ''}{views_note(pruned)} | **{layers}** / {pruned.n_layers} |"
    )


def sweep_table(points: Sequence[dict], started: float, n_budgets: int, method: str) -> str:
    """A markdown table of `method`'s sweep so far; budgets it cannot reach are listed with the smallest it can."""
    rows = []
    for p in points:
        if "skipped" in p:
            reach = f"its cheapest setting costs {p['reach']:.2f}" if p.get("reach") else _escape(p["skipped"])
            rows.append(f"| {p['budget']:.1f} | – | – | – | – | not reachable: {reach} |")
            continue
        t: Timing = p["timing"]
        rows.append(f"| {p['budget']:.1f} | {p['flops_ratio']:.0%} | {spread_seconds(t.prefill_s)} "
                    f"| {speedup_text(t)} | {p['agreement']:.2f} | {_escape(display_answer(p['answer']))} |")
    full_answer = points[0]["full_answer"] if points else ""
    full_prefill = [p["full_timing"].prefill_s.median for p in points if "full_timing" in p]
    full_line = (f" · full model prefill {spread_seconds(Spread.of(full_prefill))} along the sweep"
                 if full_prefill else "")
    out_of_reach = sum("skipped" in p for p in points)
    done = f"{len(points)}/{n_budgets} budgets" + (f" ({out_of_reach} out of reach)" if out_of_reach else "")
    head = (f"**{method}** · full answer: **{_escape(display_answer(full_answer))}**{full_line} · {done} "
            f"in {time.perf_counter() - started:.1f} s · each budget timed in turns with the full model\n\n"
            "| budget | FLOPs | prefill | speed‑up | agreement | answer |\n|---|---|---|---|---|---|\n")
    return head + "\n".join(rows) + "".join(f"\n\n{note}" for note in timing_notes(p["timing"] for p in points
                                                                                   if "timing" in p))


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:120]


# ---------------------------------------------------------------------------------------------------------------
# The model card.


def model_card_markdown(card: ModelCard) -> str:
    """A short plain description of the loaded model (never a file path)."""
    where = f"`{card.hub_id}` on the Hugging Face hub" if card.hub_id else card.source
    lines = [
        f"**Model: {card.name}** ({where}) · {card.family} · {_count(card.parameters)} parameters · "
        f"up to {card.visual_tokens} visual tokens per image · {card.layers} decoder layers"
        + (f" · quantization: {card.quantization}" if card.hub_id or card.quant != "none" else ""),
        f"**Trained on:** {card.trained_on}.",
    ]
    if card.question_types:
        kinds = " · ".join(f"{kind.replace('_', ' ')} (“{example}”)" for kind, example in card.question_types)
        lines.append(f"**It answers {len(card.question_types)} kinds of question** about such scenes: {kinds}. "
                     "Click an example (the table under the answers) to try one; on a photo of your own its answers "
                     "are guesses.")
    return "  \n".join(lines)


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


# ---------------------------------------------------------------------------------------------------------------
# Every method at one budget: a grid of small cells.

CSS = """
.pg-grid {display: grid; grid-template-columns: repeat(auto-fill, minmax(135px, 1fr)); gap: 8px}
.pg-cell {border: 1px solid #ddd; border-radius: 8px; padding: 6px; background: #fff; color: #222;
          font-size: 13px; line-height: 1.35; min-width: 0}
.pg-cell.pg-reference {border-color: #888; background: #f6f6f6}
.pg-title {font-weight: 700; margin-bottom: 4px}
.pg-cell img {width: 100%; height: auto; display: block; border-radius: 4px; image-rendering: pixelated}
.pg-layers {display: flex; gap: 1px; margin: 4px 0}
.pg-layers span {flex: 1; height: 10px}
.pg-answer {font-size: 15px; font-weight: 700; margin: 2px 0}
.pg-verdict {font-size: 12px; font-weight: 700}
.pg-same {color: #2e7d32} .pg-different {color: #c62828}
.pg-facts, .pg-time {color: #444}
.pg-noise {color: #b26a00; font-weight: 700}
.pg-waiting {color: #888; font-style: italic}
"""


EXTRAS_LABEL = "Compare all: also run"  # the page's choice of extra methods, named in the summary line
GRID_PLACEHOLDER = ('<p class="pg-waiting">Press <b>Compare all methods</b> to run PAR and the methods of the field at '
                    "the chosen budget on this image and question, side by side: what each keeps, what it answers, "
                    "how fast it is.</p>")


def all_methods_html(state: AllMethods) -> str:
    """The grid: the full model first (the reference), then one cell per method in registry order."""
    cells = [_cell(state, "full", state.full)]
    for name in [*state.results, *state.pending, *state.skipped]:
        if name in state.results:
            cells.append(_cell(state, name, state.results[name]))
        else:
            why = "running…" if name in state.pending else html.escape(state.skipped[name])
            cells.append(f'<div class="pg-cell" data-method="{html.escape(name)}"><div class="pg-title">'
                         f'{html.escape(METHOD_LABELS.get(name, name))}</div><div class="pg-waiting">{why}</div></div>')
    return f'<div class="pg-grid" id="all-methods-grid">{"".join(cells)}</div>'


def _cell(state: AllMethods, name: str, p: Prediction) -> str:
    # The patch view follows the prediction's own grid, so any model family's patch layout draws correctly.
    view = viz.dim_dropped(state.model_view, tuple(p.grid), p.kept_visual_tokens, p.empty_cells)
    view.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    kept = set(p.kept_layers)
    strip = "".join(f'<span title="layer {i}: {"run" if i in kept else "skipped"}" style="background:'
                    f'{viz.KEPT_COLOR if i in kept else viz.SKIPPED_COLOR}"></span>' for i in range(p.n_layers))
    label = html.escape(METHOD_LABELS.get(name, name))
    if name == "full":
        verdict = '<div class="pg-verdict">the reference</div>'
    elif same_answer(p, state.full):
        verdict = '<div class="pg-verdict pg-same">✓ same as full</div>'
    else:
        verdict = '<div class="pg-verdict pg-different">✗ differs from full</div>'
    return (
        f'<div class="pg-cell{" pg-reference" if name == "full" else ""}" data-method="{html.escape(name)}">'
        f'<div class="pg-title">{label}</div>'
        f'<img src="{viz.png_data_uri(view)}" alt="patches kept by {label}">'
        f'<div class="pg-layers" title="decoder layers: green run, red skipped">{strip}</div>'
        f'<div class="pg-answer">{html.escape(display_answer(p.answer))}</div>{verdict}'
        f'<div class="pg-facts">FLOPs {p.flops_ratio:.0%} · tokens {len(p.kept_visual_tokens)}/{p.n_visual_tokens}'
        f'{" (rest absorbed)" if p.absorbed else ""}'
        f'{f" · views {p.views_encoded}/{p.views}" if p.views_encoded < p.views else ""}'
        f' · layers {len(p.kept_layers)}/{p.n_layers}</div>'
        f'<div class="pg-time">{_cell_time(p, state.timed)}</div></div>'
    )


def same_answer(pruned: Prediction, full: Prediction) -> bool:
    return pruned.answer.strip().lower() == full.answer.strip().lower()


def _cell_time(p: Prediction, timed: bool) -> str:
    t = p.timing
    if not timed or t is None:
        return '<span class="pg-waiting">timing after all answers…</span>'
    line = f"prefill {spread_seconds(t.prefill_s)}"
    if t.prefill_speedup is None:
        return line
    speedup = html.escape(speedup_text(t))
    if t.noise or t.unsteady:
        note = NOISE_NOTE if t.noise else UNSTEADY_NOTE
        return f'{line}<br><span class="pg-noise" title="{html.escape(note)}">{speedup}</span>'
    return f"{line}<br>{speedup} (FLOPs allow {t.speedup_bound:.2f}×)"


def all_methods_summary(state: AllMethods) -> str:
    """One line under the grid: how many methods kept the full answer, and how the times were taken."""
    same = sum(same_answer(p, state.full) for p in state.results.values())
    parts = [f"Budget **{state.budget:.2f}** · full answer **{_escape(display_answer(state.full.answer))}** · "
             f"**{same}/{len(state.results)}** methods give the same answer"]
    if state.pending:
        parts.append(f"{len(state.pending)} still running")
    elif not state.timed:
        parts.append("timing every method in turns with the full model…")
    else:
        rounds = state.full.timing.rounds if state.full.timing else 1
        parts.append(f"times: medians of {rounds} rounds, every method in turns with the full model (fastest–"
                     "slowest round in brackets)")
    text = " · ".join(parts)
    if state.left_out:
        names = ", ".join(METHOD_LABELS.get(n, n) for n in state.left_out)
        text += f"  \nNot run this time: {names}. Tick them under *Advanced → {EXTRAS_LABEL}* to add them."
    for notice in state.notices:  # e.g. a photo shown to a model that knows only shape scenes: said next to answers
        text += f"  \n⚠ {notice}"
    timings = [p.timing for p in state.results.values() if p.timing] if state.timed else []
    return text + "".join(f"  \n{note}" for note in timing_notes(timings))
