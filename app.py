"""PAR demo app: ask a question about an image, slide the compute budget, see what was pruned and how fast it got.

Run `python app.py` (embedded model on CPU, offline) or
`python app.py --model llava-hf/llava-1.5-7b-hf --quant 4bit` (env PAR_MODEL / PAR_QUANT also work, for Spaces).
This file is layout and event wiring only; the logic lives in par_demo/demo.py.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default: no telemetry calls

import gradio as gr  # noqa: E402

from par_demo.demo import (  # noqa: E402
    DEFAULT_START_LAYER, PATCH_VIEWS, CheckedSlider, DemoApp, DemoService, SafeImage, zerogpu_enabled,
)
from par_demo.errors import UserError  # noqa: E402

TITLE = "PAR: Pruning All-Rounder — visual-token and layer pruning, live"
INTRO = (
    "Ask a question about an image and choose a compute budget. The full model and the pruned model both answer; "
    "the figures show which image patches the pruned model kept (dropped ones are dimmed), which decoder layers it "
    "ran (skipped ones in red), and how much faster it was. Budget = fraction of the full model's prefill FLOPs."
)
CSS = ".answer textarea {font-size: 1.15em; font-weight: 600}"


def build_demo(app: DemoApp) -> gr.Blocks:
    service = app.service
    with gr.Blocks(title="PAR demo") as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        gr.Markdown(app.status_markdown(), elem_id="model-status")
        view_state = gr.State(None)

        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                image = SafeImage(label="Image", sources=["upload", "clipboard", "webcam"], height=300,
                                  type="filepath", image_mode=None, elem_id="image-input")
                question = gr.Textbox(label="Question", placeholder="e.g. What color is the triangle?",
                                      lines=1, max_lines=3, elem_id="question")
                method = gr.Radio(app.method_choices(), value=service.default_method(), label="Pruning method",
                                  elem_id="method")
                budget = CheckedSlider(0.1, 1.0, value=0.5, step=0.05, elem_id="budget",
                                       label="Budget (fraction of full prefill FLOPs)")
                with gr.Accordion("Advanced", open=False):
                    tokens = CheckedSlider(0, service.n_visual_tokens, value=0, step=1, elem_id="tokens",
                                           label="Visual tokens kept (0 = from the budget)")
                    layers = CheckedSlider(0, service.n_layers, value=0, step=1, elem_id="layers",
                                           label="Decoder layers kept (0 = from the budget)")
                    start_layer = CheckedSlider(0, service.n_layers - 1, step=1, elem_id="start-layer",
                                                value=min(DEFAULT_START_LAYER, service.n_layers - 1),
                                                label="FastV / random: prune visual tokens from layer "
                                                      "(PAR uses the layer its router was trained for)")
                with gr.Row():
                    run = gr.Button("Run", variant="primary", elem_id="run")
                    sweep = gr.Button("Sweep budgets 1.0 → 0.1", elem_id="sweep")
                gr.Examples(app.examples(), inputs=[image, question], label="Examples (click one)",
                            examples_per_page=8)

            with gr.Column(scale=3, min_width=420):
                with gr.Row(equal_height=True):
                    with gr.Column():
                        full_answer = gr.Textbox(label="Full model answer", interactive=False,
                                                 elem_id="full-answer", elem_classes="answer")
                        full_timing = gr.Markdown(elem_id="full-timing")
                    with gr.Column():
                        pruned_answer = gr.Textbox(label="Pruned answer", interactive=False,
                                                   elem_id="pruned-answer", elem_classes="answer")
                        pruned_timing = gr.Markdown(elem_id="pruned-timing")
                stats = gr.Markdown(elem_id="stats")
                patch_view = gr.Radio(list(PATCH_VIEWS), value=PATCH_VIEWS[0], label="Patch view",
                                      elem_id="patch-view")
                empty_patches, empty_layers, empty_latency, empty_sweep = app.empty_outputs()
                patch_plot = gr.Plot(empty_patches, label="Image patches as the model saw them",
                                     elem_id="patch-plot")
                layer_plot = gr.Plot(empty_layers, label="Decoder layers", elem_id="layer-plot")
                latency_plot = gr.Plot(empty_latency, label="Latency", elem_id="latency-plot")
                with gr.Accordion("Raw stats (predict --json)", open=False):
                    stats_json = gr.JSON(elem_id="stats-json")

        sweep_plot = gr.Plot(empty_sweep, label="Budget sweep", elem_id="sweep-plot")
        sweep_table = gr.Markdown(elem_id="sweep-table")

        # Hidden outputs of the public API endpoint.
        api_full = gr.Textbox(visible=False)
        api_pruned = gr.Textbox(visible=False)
        api_stats = gr.JSON(visible=False)
        api_full_stats = gr.JSON(visible=False)
        api_trigger = gr.Button(visible=False)

        run_inputs = [image, question, method, budget, tokens, layers, start_layer, patch_view]
        run_outputs = [full_answer, full_timing, pruned_answer, pruned_timing, stats, patch_plot, layer_plot,
                       latency_plot, stats_json, view_state]
        # All model work shares one queue slot: one model, one request at a time.
        model_queue = dict(concurrency_id="model", concurrency_limit=1)
        gr.on([run.click, question.submit], app.run, run_inputs, run_outputs, api_visibility="private",
              **model_queue)
        budget.release(app.rerun, run_inputs, run_outputs, api_visibility="private", **model_queue)
        patch_view.change(app.redraw_patches, [view_state, patch_view], patch_plot, api_visibility="private",
                          queue=False)
        sweep.click(app.sweep, [image, question, method, start_layer], [sweep_plot, sweep_table],
                    api_visibility="private", **model_queue)
        api_trigger.click(app.api_compare, [image, question, method, budget],
                          [api_full, api_pruned, api_stats, api_full_stats], api_name="compare", **model_queue)
    # One model serves everyone: requests wait in a bounded queue instead of piling up in memory.
    demo.queue(default_concurrency_limit=1, max_size=64)
    return demo


def launch_options() -> dict:
    """Options of `demo.launch` that are part of the app's look (tests launch with the same ones)."""
    return dict(css=CSS, footer_links=["api", "gradio"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--model", default=os.environ.get("PAR_MODEL") or None,
                        help="model path or Hugging Face id (default: the embedded ShapesVQA model; env PAR_MODEL)")
    parser.add_argument("--quant", default=os.environ.get("PAR_QUANT", "none"), choices=["none", "8bit", "4bit"],
                        help="bitsandbytes quantisation for large models (env PAR_QUANT)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (0.0.0.0 to serve the network)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    for name, what in (("min", "smallest"), ("max", "largest")):
        env = f"PAR_{name.upper()}_PIXELS"
        parser.add_argument(f"--{name}-pixels", type=int, default=int(os.environ[env]) if os.environ.get(env) else None,
                            help=f"dynamic-resolution models (Qwen2.5-VL): {what} image area in pixels; one visual "
                                 f"token per 28 x 28 px, so fewer pixels answer faster (env {env})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    try:  # the model is loaded at start-up, outside any request (ZeroGPU requires this)
        options = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v}
        service = DemoService.from_model(args.model, quant=args.quant, options=options)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"model {service.model_name} loaded in {time.perf_counter() - started:.1f} s", flush=True)
    if not zerogpu_enabled():  # on ZeroGPU no GPU is attached outside requests, so no warm-up there
        service.start_warm_up()  # in the background: the page comes up meanwhile
    demo = build_demo(DemoApp(service))
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_options())


if __name__ == "__main__":
    main()
