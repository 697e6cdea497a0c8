"""Stock transformers `generate` as a bench row: what users would otherwise run, timed beside the engine."""

import json

from par_demo.cli import main
from par_demo.engine import Engine
from par_demo.stock import FirstTokenClock, stock_generate

QUESTION = "What color is the circle?"


def test_stock_generate_gives_the_engine_full_models_tokens_and_cache_size(tiny, scene):
    from par_demo.predict import Predictor

    inputs = Predictor(tiny).encode(scene, QUESTION)
    ours = Engine(tiny.model).generate(inputs, max_new_tokens=6)
    stock = stock_generate(tiny, inputs, 6)
    assert stock.tokens == ours.tokens  # greedy, every token generated: the same answer
    assert stock.kv_cache_bytes == ours.kv_cache_bytes > 0  # the same keys and values, counted from its own cache
    assert 0 < stock.prefill_s < stock.total_s  # the first token's time is taken inside the call, before the rest


def test_stock_generate_decodes_past_eos_like_the_engine_on_a_trained_model(scene):
    """The embedded model answers in a word or two and then says EOS: both runs take it and go on."""
    from par_demo.models import load_model
    from par_demo.predict import Predictor

    embedded = load_model(device="cpu")
    inputs = Predictor(embedded).encode(scene, QUESTION)
    ours = Engine(embedded.model).generate(inputs, max_new_tokens=8)  # no eos_token_id: never stops early
    stock = stock_generate(embedded, inputs, 8)
    assert embedded.processor.tokenizer.eos_token_id in ours.tokens[:-1]  # EOS came early, and was decoded past
    assert stock.tokens == ours.tokens


def test_bench_puts_a_stock_row_beside_the_full_model(capsys):
    code = main(["bench", "--model", "random:llava-tiny", "--device", "cpu", "--methods", "full,stock", "--budgets", "0.5",
                 "--repeats", "1", "--new-tokens", "3", "--json"])
    assert code == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert set(rows) == {"full", "stock"}
    stock, full = rows["stock"], rows["full"]
    assert stock["flops_ratio"] == 1.0 and stock["new_tokens"] == 3
    assert stock["kept_visual_tokens"] == full["kept_visual_tokens"] and stock["kept_layers"] == full["kept_layers"]
    assert stock["kv_cache_mb"] == full["kv_cache_mb"]
    assert stock["speedup_prefill"] == full["prefill_s"] / stock["prefill_s"]


def test_the_clock_stops_at_the_first_new_token_not_at_the_prompt(tiny, scene):
    """`generate` hands its streamer the prompt, then one put per new token: the clock's second put is the end of
    the prefill. Pinned here, since a change of that order would silently time something else."""
    from par_demo.predict import Predictor

    class Recording(FirstTokenClock):
        def __init__(self):
            super().__init__()
            self.seen = []

        def put(self, tokens):
            self.seen.append(tokens.reshape(-1).tolist())
            super().put(tokens)

    inputs = Predictor(tiny).encode(scene, QUESTION)
    clock = Recording()
    out = tiny.model.generate(**tiny.family.stock_inputs(inputs), max_new_tokens=3, min_new_tokens=3,
                              do_sample=False, streamer=clock)
    prompt = inputs["input_ids"][0].tolist()
    assert clock.seen[0] == prompt
    assert clock.seen[1:] == [[t] for t in out[0, len(prompt):].tolist()]
    assert clock.first is not None
