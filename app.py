"""PAR demo app: ask a question about an image, slide the compute budget, see what was pruned and how fast it got.

Run `python app.py` (embedded model on CPU, offline) or
`python app.py --model llava-hf/llava-1.5-7b-hf --quant 4bit` (env PAR_MODEL / PAR_QUANT also work, for Spaces).
This file is layout and event wiring only; the logic lives in par_demo/ (demo.py: handlers, service.py: the model
side, panels.py and viz.py: what the page shows).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default: no telemetry calls
# gradio reads the port from the environment as a number while it is imported, and a bad value raised a traceback
# from inside gradio: it is refused here first, in one line, as a bad --port is.
if not os.environ.get("GRADIO_SERVER_PORT", "7860").strip().isdigit():
    sys.exit(f"app.py: error: GRADIO_SERVER_PORT={os.environ['GRADIO_SERVER_PORT']!r}: give a port number")

from par_demo.zerogpu import zerogpu_enabled  # noqa: E402  (imports no torch)

if zerogpu_enabled():  # ZeroGPU patches CUDA when `spaces` is imported, so before anything else can touch it
    import spaces  # noqa: F401, E402

import gradio as gr  # noqa: E402

from par_demo import panels  # noqa: E402
from par_demo.demo import (  # noqa: E402
    PATCH_VIEWS, CheckedCheckboxGroup, CheckedRadio, CheckedSlider, DemoApp, SafeImage,
)
from par_demo.errors import UserError  # noqa: E402
from par_demo.inputs import EXTRA_CHOICES  # noqa: E402
from par_demo.arguments import IMAGE_OPTIONS  # noqa: E402
from par_demo.methods.base import BUDGET_UNITS  # noqa: E402
from par_demo.models import QUANT_CHOICES  # noqa: E402
from par_demo.service import DEFAULT_START_LAYER, DemoService  # noqa: E402

TITLE = "PAR: Pruning All-Rounder — visual-token and layer pruning, live"
BUDGET_MEANS = {"flops": "the fraction of the full model's prefill FLOPs",
                "time": "the fraction of the full model's prefill time on this machine, as measured here"}


BUDGET_LABELS = {"flops": "Budget (fraction of full prefill FLOPs)",
                 "time": "Budget (fraction of full prefill time, measured here)"}


def intro(unit: str) -> str:
    return (f"Ask a question about an image and choose a compute budget ({BUDGET_MEANS[unit]}). "
            "The full model and the pruned model both answer, and both are timed in turns in the same request; the "
            "figures show which image patches the pruned model kept, which decoder layers it ran, and how much faster "
            "it was. **Compare all methods** runs every method at the budget side by side.")
CSS = panels.CSS + """
.answer textarea {font-size: 1.15em; font-weight: 600}
#image-notice {color: #9a5b00}
/* The sweep and stats tables: never break a word in the middle; on a narrow screen a table scrolls sideways. */
#sweep-table table, #stats table {display: block; overflow-x: auto}
#sweep-table th, #sweep-table td, #stats th, #stats td {word-break: normal; overflow-wrap: normal; hyphens: none}
#sweep-table th, #sweep-table td:not(:last-child), #stats th {white-space: nowrap}
#sweep-table td:last-child {min-width: 7em}
#stats td {min-width: 6em}
"""
# On a phone the grid is below the first screens; bring it into view when it starts filling in.
SCROLL_TO_GRID = "() => document.getElementById('compare-all')?.scrollIntoView({behavior: 'smooth'})"


def build_demo(app: DemoApp) -> gr.Blocks:
    service = app.service
    with gr.Blocks(title="PAR demo") as demo:
        gr.Markdown(f"# {TITLE}\n{intro(service.budget_unit)}")
        gr.Markdown(app.model_markdown(), elem_id="model-card")
        view_state = gr.State(None)

        with gr.Row():
            # Inputs, then the two answers right under Run (on a phone too), then the examples.
            with gr.Column(scale=2, min_width=320):
                image = SafeImage(label="Image", sources=["upload", "clipboard", "webcam"], height=300,
                                  type="filepath", image_mode=None, elem_id="image-input")
                question = gr.Textbox(label="Question", placeholder="e.g. What color is the triangle?",
                                      lines=1, max_lines=3, elem_id="question")
                method = CheckedRadio(app.method_choices(), value=service.default_method(), label="Pruning method",
                                      elem_id="method")
                budget = CheckedSlider(0.1, 1.0, value=0.5, step=0.05, elem_id="budget", label=BUDGET_LABELS[
                    service.budget_unit])
                with gr.Accordion("Advanced", open=False):
                    tokens = CheckedSlider(0, service.n_visual_tokens, value=0, step=1, elem_id="tokens",
                                           label="Visual tokens kept (0 = from the budget)")
                    layers = CheckedSlider(0, service.n_layers, value=0, step=1, elem_id="layers",
                                           label="Decoder layers kept (0 = from the budget)")
                    start_layer = CheckedSlider(0, service.n_layers - 1, step=1, elem_id="start-layer",
                                                value=min(DEFAULT_START_LAYER, service.n_layers - 1),
                                                label="FastV / random: prune visual tokens from layer "
                                                      "(PAR uses the layer its router was trained for)")
                    extras = CheckedCheckboxGroup(EXTRA_CHOICES, value=[], label=panels.EXTRAS_LABEL,
                                                 elem_id="compare-extras")
                run = gr.Button("Run", variant="primary", elem_id="run")
                with gr.Row():
                    compare_all = gr.Button("Compare all methods", elem_id="compare-all-button", min_width=150)
                    sweep = gr.Button("Sweep budgets 1.0 → 0.1", elem_id="sweep", min_width=150)
                with gr.Row(equal_height=True):
                    with gr.Column(min_width=160):
                        full_answer = gr.Textbox(label="Full model answer", interactive=False,
                                                 elem_id="full-answer", elem_classes="answer")
                        full_timing = gr.Markdown(elem_id="full-timing")
                    with gr.Column(min_width=160):
                        pruned_answer = gr.Textbox(label="Pruned answer", interactive=False,
                                                   elem_id="pruned-answer", elem_classes="answer")
                        pruned_timing = gr.Markdown(elem_id="pruned-timing")
                image_notice = gr.Markdown(elem_id="image-notice")
                gr.Examples(app.examples(), inputs=[image, question], label="Examples (click one)",
                            examples_per_page=8)

            with gr.Column(scale=3, min_width=320):
                stats = gr.Markdown(elem_id="stats")
                patch_view = gr.Radio(list(PATCH_VIEWS), value=PATCH_VIEWS[0], label="Patch view",
                                      elem_id="patch-view")
                empty_patches, empty_layers, empty_latency, empty_sweep, empty_agreement = app.empty_outputs()
                patch_plot = gr.Plot(empty_patches, label="Image patches as the model saw them",
                                     elem_id="patch-plot")
                layer_plot = gr.Plot(empty_layers, label="Decoder layers", elem_id="layer-plot")
                latency_plot = gr.Plot(empty_latency, label="Latency", elem_id="latency-plot")
                with gr.Accordion("Raw stats (predict --json)", open=False):
                    stats_json = gr.JSON(elem_id="stats-json")

        with gr.Column(elem_id="compare-all"):
            gr.Markdown("### All methods at this budget")
            compare_grid = gr.HTML(panels.GRID_PLACEHOLDER, elem_id="compare-grid")
            compare_summary = gr.Markdown(elem_id="compare-summary")
            compare_download = gr.DownloadButton("Download this comparison (JSON)", visible=False,
                                                 elem_id="compare-download")

        with gr.Row():
            sweep_plot = gr.Plot(empty_sweep, label="Budget sweep: latency", elem_id="sweep-plot", min_width=320)
            agreement_plot = gr.Plot(empty_agreement, label="Budget sweep: agreement", elem_id="agreement-plot",
                                     min_width=320)
        sweep_table = gr.Markdown(elem_id="sweep-table")

        # Hidden outputs of the public API endpoints.
        api_full = gr.Textbox(visible=False)
        api_pruned = gr.Textbox(visible=False)
        api_stats = gr.JSON(visible=False)
        api_full_stats = gr.JSON(visible=False)
        api_all = gr.JSON(visible=False)
        api_trigger = gr.Button(visible=False)
        api_all_trigger = gr.Button(visible=False)

        run_inputs = [image, question, method, budget, tokens, layers, start_layer, patch_view]
        run_outputs = [full_answer, full_timing, pruned_answer, pruned_timing, image_notice, stats, patch_plot,
                       layer_plot, latency_plot, stats_json, view_state]
        # All model work shares one queue slot: one model, one request at a time.
        model_queue = dict(concurrency_id="model", concurrency_limit=1)
        gr.on([run.click, question.submit], app.run, run_inputs, run_outputs, api_visibility="private",
              **model_queue)
        budget.release(app.rerun, run_inputs, run_outputs, api_visibility="private", **model_queue)
        # the smallest budget the chosen method reaches, under the slider (measured by the warm-up)
        for event in (method.change, demo.load):
            event(app.budget_note, method, budget, api_visibility="private", queue=False)
        patch_view.change(app.redraw_patches, [view_state, patch_view], patch_plot, api_visibility="private",
                          queue=False)
        compare_all.click(app.compare_all, [image, question, budget, start_layer, extras],
                          [compare_grid, compare_summary, compare_download], api_name="all_methods_grid",
                          api_visibility="private", **model_queue)  # its own name: "compare_all" is the API's
        compare_all.click(None, js=SCROLL_TO_GRID, api_visibility="private", queue=False)
        sweep.click(app.sweep, [image, question, method, start_layer], [sweep_plot, agreement_plot, sweep_table],
                    api_visibility="private", **model_queue)
        api_trigger.click(app.api_compare, [image, question, method, budget],
                          [api_full, api_pruned, api_stats, api_full_stats], api_name="compare", **model_queue)
        api_all_trigger.click(app.api_compare_all, [image, question, budget, extras], api_all,
                              api_name="compare_all", **model_queue)
    # One model serves everyone: requests wait in a bounded queue instead of piling up in memory.
    demo.queue(default_concurrency_limit=1, max_size=64)
    return demo


def launch_options() -> dict:
    """Options of `demo.launch` that are part of the app's look (tests launch with the same ones)."""
    return dict(css=CSS, footer_links=["api", "gradio"])


@contextlib.contextmanager
def served_locally(app: DemoApp) -> Iterator[str]:
    """The app launched in this process on a free 127.0.0.1 port (tests and benchmarks); yields its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    blocks = build_demo(app)
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                  **launch_options())
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        blocks.close()


def default_budget_unit() -> str:
    """Time is what a visitor feels; ZeroGPU attaches its GPU only inside requests, so there is nothing to time at
    start-up and the slider falls back to FLOPs."""
    return "flops" if zerogpu_enabled() else "time"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--model", default=os.environ.get("PAR_MODEL") or None,
                        help="model path or Hugging Face id (default: the embedded ShapesVQA model; env PAR_MODEL)")
    parser.add_argument("--quant", default=os.environ.get("PAR_QUANT", "none"), choices=QUANT_CHOICES,
                        help="bitsandbytes quantisation for large models (env PAR_QUANT)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (0.0.0.0 to serve the network)")
    # environment values are given as strings: argparse converts them as it does the flags', with one error line
    parser.add_argument("--port", type=int, default=os.environ.get("GRADIO_SERVER_PORT", "7860"))
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument("--budget-unit", default=os.environ.get("PAR_BUDGET_UNIT") or default_budget_unit(),
                        choices=BUDGET_UNITS,
                        help="what the budget slider is a fraction of: the prefill's time on this machine (default; a "
                             "cost model measured at start-up and cached), or its FLOPs (the default on ZeroGPU, "
                             "where no GPU is attached at start-up to time; env PAR_BUDGET_UNIT)")
    for name, what in (("min", "smallest"), ("max", "largest")):
        env = f"PAR_{name.upper()}_PIXELS"
        parser.add_argument(f"--{name}-pixels", type=int, default=os.environ.get(env) or None,
                            help=f"dynamic-resolution models (Qwen2.5-VL): {what} image area in pixels; one visual "
                                 f"token per 28 x 28 px, so fewer pixels answer faster (env {env})")
    parser.add_argument("--max-tiles", type=int, default=os.environ.get("PAR_MAX_TILES") or None,
                        help="tiled models (SmolVLM, InternVL3): at most this many tiles per image besides the "
                             "global view; fewer tiles answer faster (env PAR_MAX_TILES)")
    args = parser.parse_args(argv)
    # argparse checks the choices of flags, not of defaults: the environment's values are checked here
    for option, env, choices in (("quant", "PAR_QUANT", QUANT_CHOICES),
                                 ("budget_unit", "PAR_BUDGET_UNIT", BUDGET_UNITS)):
        if getattr(args, option) not in choices:
            parser.error(f"{env}={getattr(args, option)!r}: choose one of {', '.join(choices)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # One line per event in the server log: a refused input is a warning line, only real faults get a traceback.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own HTTP calls are not news
    started = time.perf_counter()
    try:  # the model is loaded at start-up, outside any request (ZeroGPU requires this)
        options = {k: getattr(args, k) for k in IMAGE_OPTIONS if getattr(args, k) is not None}
        service = DemoService.from_model(args.model, quant=args.quant, options=options, budget_unit=args.budget_unit)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"model {service.model_name} loaded in {time.perf_counter() - started:.1f} s on "
          f"{service.predictor.loaded.placement()}", flush=True)
    demo = build_demo(DemoApp(service))
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True,
                **launch_options())
    if not zerogpu_enabled():  # on ZeroGPU no GPU is attached outside requests, so no warm-up there
        # Only once the page is served: building and starting it keeps a core busy for seconds, and the warm-up
        # times the cost model that time budgets go by. Timed next to the start-up, the check of a cached fit read
        # the default model's full prefill 1.4-4.1x slower than the fit (three of four starts) and measured the
        # fit again in those conditions; started here, neither of two starts did. A visitor's request meanwhile
        # waits its turn on the model thread.
        service.start_warm_up()
    demo.block_thread()


if __name__ == "__main__":
    main()
