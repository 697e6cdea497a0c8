"""Accuracy against measured prefill time, every method: the figure and table of the README.

    python scripts/plot_accuracy_time.py \
        --eval docs/benchmarks/cpu-eval-time-budget-embedded-576.jsonl \
        --bench docs/benchmarks/cpu-time-budget-embedded-576.json \
        --html /tmp/accuracy-time.html --png docs/screenshots/accuracy-time.png

Accuracy comes from `eval --budget-unit time --json` (one row per method and budget), the time from `bench
--budget-unit time --json` at the same budgets on the same model: the prefill's measured time as a fraction of the
full model's in the same run (the inverse of its measured speed-up). `--png` screenshots the HTML through
Playwright with the system's Chromium, as the browser tests do (`--chromium`, default /usr/bin/chromium). Prints the
table as Markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import plotly.graph_objects as go

LABELS = {"par": "PAR", "fastv": "FastV", "visionzip": "VisionZip", "divprune": "DivPrune", "cdpruner": "CDPruner",
          "layerdrop": "layer drop", "random": "random tokens", "downsample": "downsample", "full": "full model"}


def points(eval_rows: list[dict], bench: dict) -> dict[str, list[tuple[float, float, float]]]:
    """{method: [(budget, measured time fraction, accuracy %)]} for every method and budget both files have."""
    measured = {(r["method"], r["budget"]): 1 / r["speedup_prefill"] for r in bench["rows"] if r.get("speedup_prefill")}
    found: dict[str, list[tuple[float, float, float]]] = {}
    for row in eval_rows:
        key = (row["method"], row["budget"])
        accuracy = row.get("accuracy")
        if key in measured and accuracy is not None and accuracy == accuracy:  # NaN: out of reach
            found.setdefault(row["method"], []).append((row["budget"], measured[key], 100 * accuracy))
    return {method: sorted(values) for method, values in found.items()}


def figure(found: dict[str, list[tuple[float, float, float]]], title: str) -> go.Figure:
    fig = go.Figure()
    for method, values in found.items():
        fig.add_trace(go.Scatter(
            x=[t for _, t, _ in values], y=[a for _, _, a in values], name=LABELS.get(method, method),
            mode="markers" if method == "full" else "lines+markers",
            marker=dict(size=12 if method in ("par", "full") else 8),
            line=dict(width=4 if method == "par" else 2),
            text=[f"budget {b:g}" for b, _, _ in values], hovertemplate="%{text}: %{x:.2f} of the time, %{y:.1f} %"))
    fig.update_layout(title=title, xaxis_title="prefill time, fraction of the full model's (measured)",
                      yaxis_title="accuracy on the held-out samples (%)", template="plotly_white",
                      width=900, height=560, legend=dict(x=1.02, y=1))
    fig.update_xaxes(range=[0, 1.05])
    return fig


def table(found: dict[str, list[tuple[float, float, float]]]) -> str:
    budgets = sorted({b for values in found.values() for b, _, _ in values if b < 1}, reverse=True)
    lines = ["| method | " + " | ".join(f"time budget {b:g}: accuracy (measured time)" for b in budgets) + " |",
             "|---" * (len(budgets) + 1) + "|"]
    for method, values in found.items():
        at = {b: (t, a) for b, t, a in values}
        if method == "full":
            lines.append(f"| full model | {at[1.0][1]:.1f} % (1.00) |" + " |" * (len(budgets) - 1))
            continue
        cells = [f"{at[b][1]:.1f} % ({at[b][0]:.2f})" if b in at else "out of reach" for b in budgets]
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def screenshot(html: Path, png: Path, chromium: str) -> None:
    from playwright import sync_api

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 920, "height": 580})
        page.goto(html.resolve().as_uri())
        page.locator(".js-plotly-plot").screenshot(path=str(png))
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", required=True, help="JSONL of `eval --budget-unit time --json`")
    parser.add_argument("--bench", required=True, help="JSON of `bench --budget-unit time --json`, same budgets")
    parser.add_argument("--html", required=True, help="where to write the figure (self-contained HTML)")
    parser.add_argument("--png", default=None, help="also a PNG of it, screenshotted with headless Chromium")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--title", default="Accuracy against measured prefill time (embedded 576-token model, CPU)")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in Path(args.eval).read_text().splitlines() if line.strip()]
    found = points(rows, json.loads(Path(args.bench).read_text()))
    if not found:
        print("no method and budget is in both files", file=sys.stderr)
        return 1
    figure(found, args.title).write_html(args.html, include_plotlyjs=True, config={"displayModeBar": False})
    if args.png:
        screenshot(Path(args.html), Path(args.png), args.chromium)
    print(table(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
