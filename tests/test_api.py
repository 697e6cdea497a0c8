"""The Python API (`par_demo.wrap`, `par_demo.load`, `Pruner`): a model loaded with stock transformers, wrapped,
answers exactly as `predict --json` does on the same checkpoint, for LLaVA (the embedded model), Qwen2.5-VL and
SmolVLM; bad input is one `UserError` line."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import par_demo
from par_demo import cli
from par_demo.models import DEFAULT_MODEL, build_random_model
from par_demo.router import MetaRouter, RouterConfig, fingerprint, save_router
from par_demo.shapes import image_path, load_jsonl, make_dataset

HELD_OUT_SEED = 777  # drawn as the 1,200 held-out samples of the docs' accuracy tables are (never trained on)
SAME = ("answer", "method", "budget", "flops", "flops_full", "flops_ratio", "kept_visual_tokens", "kept_layers",
        "start_layer", "n_visual_tokens", "grid", "views_encoded", "views", "new_tokens", "absorbed", "family")


def predict_json(capsys, model: str, image: str, question: str, method: str = "par", budget: float = 0.5) -> dict:
    assert cli.main(["predict", "--model", model, "--device", "cpu", "--image", image, "--question", question,
                     "--method", method, "--budget", str(budget), "--rounds", "1", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def assert_same(result, reference: dict) -> None:
    mine = result.to_dict()
    assert {key: mine[key] for key in SAME} == {key: reference[key] for key in SAME}
    assert result.text == reference["answer"]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    folder = make_dataset(tmp_path_factory.mktemp("held-out"), n=20, seed=HELD_OUT_SEED)
    return [(image_path(folder, row["image"]), row["question"]) for row in load_jsonl(folder)]


def test_embedded_model_loaded_with_stock_transformers_and_wrapped_answers_as_predict_json(held_out, capsys):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(DEFAULT_MODEL)
    processor = AutoProcessor.from_pretrained(DEFAULT_MODEL)
    pruner = par_demo.wrap(model, processor)
    results = pruner.generate([image for image, _ in held_out], [question for _, question in held_out],
                              method="par", budget=0.5)
    assert len(results) == 20
    for result, (image, question) in zip(results, held_out):
        assert_same(result, predict_json(capsys, DEFAULT_MODEL, image, question))
    # PAR really pruned: tokens dropped at half the FLOPs (layers too on some questions)
    assert all(len(r.kept_visual_tokens) < r.n_visual_tokens and r.flops_ratio <= 0.5 for r in results)


def save_tiny(preset: str, folder) -> None:
    """A tiny random model of `preset` saved as a checkpoint, with an untrained router in its `router/` folder
    (what `predict --model FOLDER` and `wrap` both find)."""
    model, processor, family = build_random_model(preset)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    loaded = par_demo.load(str(folder)).predictor.loaded
    torch.manual_seed(0)
    config = RouterConfig(lm_width=64, n_layers=loaded.n_layers, width=16, heads=1, start_layer=0,
                          model=fingerprint(loaded))
    save_router(MetaRouter(config), folder / "router")


def processor_parts(folder) -> SimpleNamespace:
    """What the stock Qwen2.5-VL, SmolVLM and InternVL3 processors hold and `wrap` reads: they cannot be built here
    (their video processors need torchvision), so a caller without torchvision hands over these three."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return SimpleNamespace(image_processor=AutoImageProcessor.from_pretrained(folder), tokenizer=tokenizer,
                           chat_template=tokenizer.chat_template)


# Budgets each tiny model's PAR reaches on the test scene, measured: the second skips a layer on every family and
# leaves tiles unencoded on the tiled ones (the tower is most of the tiny Qwen2.5-VL's prefill: PAR's cheapest
# setting there costs 0.52). "stock": AutoProcessor's own (Idefics3Processor for the idefics3 type).
@pytest.mark.parametrize("preset, processor_kind, budgets", [
    ("qwen2.5-vl-tiny", "parts", (0.8, 0.6)),
    ("smolvlm-tiny", "stock", (0.6, 0.3)),
    ("smolvlm-tiny", "parts", (0.6, 0.3)),
    ("internvl3-tiny", "parts", (0.6, 0.3)),
])
def test_tiny_families_loaded_with_stock_transformers_and_wrapped_answer_as_predict_json(
        preset, processor_kind, budgets, scene, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = tmp_path / preset
    save_tiny(preset, folder)
    image = tmp_path / "scene.png"
    scene.save(image)
    processor = AutoProcessor.from_pretrained(folder) if processor_kind == "stock" else processor_parts(folder)
    pruner = par_demo.wrap(AutoModelForImageTextToText.from_pretrained(folder), processor)
    assert pruner.family == par_demo.load(str(folder)).family
    results = []
    for question, budget in zip(["what color is the circle?", "how many objects are there?"], budgets):
        result = pruner.generate(str(image), question, method="par", budget=budget)
        assert_same(result, predict_json(capsys, str(folder), str(image), question, budget=budget))
        assert result.flops_ratio <= budget
        results.append(result)
    assert len(results[1].kept_layers) < results[1].n_layers
    if preset != "qwen2.5-vl-tiny":
        assert results[1].views_encoded < results[1].views


def test_an_unsupported_model_is_one_line_naming_the_supported_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, vocab_size=64))
    with pytest.raises(par_demo.UserError) as error:
        par_demo.wrap(text_only, processor=None)
    message = str(error.value)
    assert "\n" not in message and "'llama' is not supported" in message
    assert all(name in message for name in ("llava", "qwen2_5_vl", "smolvlm", "internvl"))
    with pytest.raises(par_demo.UserError, match="takes a transformers vision-language model"):
        par_demo.wrap("llava-hf/llava-1.5-7b-hf", processor=None)


def test_wrap_refuses_a_tokenizer_in_place_of_the_processor(tiny):
    with pytest.raises(par_demo.UserError, match="takes the model's processor"):
        par_demo.wrap(tiny.model, tiny.processor.tokenizer)


def test_methods_say_which_can_run_and_why_not(scene):
    pruner = par_demo.load("random:llava-tiny", device="cpu")
    info = {m.name: m for m in pruner.methods()}
    assert set(info) == set(par_demo.METHODS)
    assert info["fastv"].available and info["fastv"].reason is None and info["fastv"].group == "field"
    assert not info["par"].available and "train-router" in info["par"].reason  # no router for random weights
    assert info["full"].group == "reference" and info["random"].group == "baseline"
    assert info["par-drop"].group == "ablation"
    with pytest.raises(par_demo.UserError, match="par is unavailable"):
        pruner.generate(scene, "where is the square?")  # PAR is the default method


def test_lists_pair_up_or_broadcast_and_mismatched_lists_are_refused(scene):
    pruner = par_demo.load("random:llava-tiny", device="cpu")
    other = scene.rotate(90)

    def one(image, question):
        return answered(pruner.generate(image, question, method="fastv", budget=0.5))

    def answered(result):  # everything but the times
        return {key: result.to_dict()[key] for key in SAME} | {"token_scores": result.token_scores}

    paired = pruner.generate([scene, other], ["what color?", "how many?"], method="fastv", budget=0.5)
    assert [answered(r) for r in paired] == [one(scene, "what color?"), one(other, "how many?")]
    questions = pruner.generate(other, ["what color?", "how many?"], method="fastv", budget=0.5)
    assert [answered(r) for r in questions] == [one(other, "what color?"), one(other, "how many?")]
    images = pruner.generate([other, scene], "how many?", method="fastv", budget=0.5)
    assert [answered(r) for r in images] == [one(other, "how many?"), one(scene, "how many?")]
    with pytest.raises(par_demo.UserError, match="2 images and 3 questions"):
        pruner.generate([scene, scene], ["a?", "b?", "c?"], method="fastv")
    with pytest.raises(par_demo.UserError, match="empty list"):
        pruner.generate([], "a?", method="fastv")
    calls = []
    real = pruner.predictor.predict
    pruner.predictor.predict = lambda *args, **kwargs: calls.append(args) or real(*args, **kwargs)
    with pytest.raises(par_demo.UserError, match="the question is empty"):
        pruner.generate(scene, ["what color?", " <image> "], method="fastv")
    with pytest.raises(par_demo.UserError, match="the question must be text"):
        pruner.generate([scene, other], ["what color?", None], method="fastv")
    assert calls == []  # refused before the first answer, not after it


def test_the_full_model_runs_without_a_budget_and_compare_checks_its_start_layer_once(scene):
    pruner = par_demo.load("random:llava-tiny", device="cpu")
    full = pruner.generate(scene, "what color?", method="full", max_new_tokens=1)
    assert full.budget == 1.0 and full.flops_ratio == 1.0
    assert pruner.generate(scene, "what color?", method="fastv", max_new_tokens=1).budget == 0.5
    with pytest.raises(par_demo.UserError, match=r"pruning start layer must be an integer in \[0, 8\], got 99"):
        pruner.compare(scene, "what color?", ["fastv", "random"], start_layer=99)


@pytest.mark.parametrize("call, message", [
    (dict(budget=1.5), "budget must be in"),
    (dict(budget=True), "budget must be a number"),
    (dict(method="nope"), "unknown method"),
    (dict(image=123), "an image is a file path, bytes or a PIL image"),
    (dict(image=["missing.png"]), "not found"),
    (dict(start_layer=None), "pruning start layer must be an integer"),
    (dict(rounds=-1), "rounds must be a whole number"),
    (dict(question=""), "the question is empty"),
])
def test_bad_input_is_one_user_error_line(scene, call, message):
    pruner = par_demo.load("random:llava-tiny", device="cpu")
    arguments = dict(image=scene, question="what color?", method="fastv") | call
    with pytest.raises(par_demo.UserError, match=message) as error:
        pruner.generate(**arguments)
    assert "\n" not in str(error.value)


def test_load_refuses_an_unknown_device_and_wrap_a_llava_model_without_its_processor(tiny):
    with pytest.raises(par_demo.UserError, match="unknown device 'tpu'"):
        par_demo.load("random:llava-tiny", device="tpu")
    with pytest.raises(par_demo.UserError, match="'meta': a model runs on cpu, cuda or mps"):
        par_demo.load("random:llava-tiny", device="meta")
    if not torch.cuda.is_available():  # a device torch knows but this machine lacks: one line, not an AssertionError
        with pytest.raises(par_demo.UserError, match="no CUDA GPU"):
            par_demo.load("random:llava-tiny", device="cuda:1")
    parts = SimpleNamespace(image_processor=tiny.processor.image_processor, tokenizer=tiny.processor.tokenizer)
    with pytest.raises(par_demo.UserError, match="takes its LlavaProcessor"):
        par_demo.wrap(tiny.model, parts)
    with pytest.raises(par_demo.UserError, match="whole model with its LM head"):
        par_demo.wrap(tiny.model.model, tiny.processor)


def test_wrap_refusing_its_input_leaves_the_callers_model_as_it_was(tmp_path):
    from par_demo.models import load_model

    model = load_model("random:llava-tiny", device="cpu").model
    model.train()
    layers = [type(m) for m in model.modules()]
    with pytest.raises(par_demo.UserError, match="is not a router folder"):
        par_demo.wrap(model, load_model("random:llava-tiny", device="cpu").processor, router=tmp_path / "nowhere")
    assert model.training and [type(m) for m in model.modules()] == layers  # no eval mode, no packed layers


def test_rounds_time_the_method_against_the_full_model(scene):
    pruner = par_demo.load("random:llava-tiny", device="cpu")
    untimed = pruner.generate(scene, "what color?", method="fastv", budget=0.5)
    timed = pruner.generate(scene, "what color?", method="fastv", budget=0.5, rounds=2)
    assert untimed.timing is None
    assert timed.timing.rounds == 2 and timed.timing.prefill_speedup is not None
    assert timed.to_dict()["timing"]["speedup_bound"] == pytest.approx(1 / timed.flops_ratio)
    assert timed.answer == untimed.answer


def test_compare_answers_with_every_method_of_the_field_and_times_them_together(scene):
    pruner = par_demo.load("random:llava-tiny", device="cpu")
    state = pruner.compare(scene, "what color is it?", budget=0.5, rounds=2)
    assert state.timed and state.full.method == "full" and state.full.timing.rounds == 2
    assert set(state.results) | set(state.skipped) == {m.name for m in pruner.methods() if m.group == "field"}
    assert "par" in state.skipped  # no router for random weights: said, not raised
    assert all(p.timing.rounds == 2 and p.flops_ratio <= 0.5 for p in state.results.values())
    assert [entry["method"] for entry in state.to_dict()["methods"]] == list(state.results)
    chosen = pruner.compare(scene, "what color is it?", methods=["random", "fastv", "random"], budget=0.5, rounds=1)
    assert list(chosen.results) == ["random", "fastv"]
    assert list(pruner.compare(scene, "what color is it?", methods="fastv", rounds=1).results) == ["fastv"]
    # start layer 0, which FastV cannot use: it starts at 1, and no method's refusal would stop the others
    early = pruner.compare(scene, "what color is it?", methods=["fastv", "random", "visionzip"], start_layer=0, rounds=1)
    assert list(early.results) == ["fastv", "random", "visionzip"] and early.results["fastv"].start_layer == 1
    with pytest.raises(par_demo.UserError, match="the full model, which always runs as the reference: leave full out"):
        pruner.compare(scene, "what color is it?", methods=["full", "fastv"])


def test_load_takes_a_pathlib_path_and_refuses_a_number_in_one_line(scene):
    from pathlib import Path

    from par_demo.models import DEFAULT_MODEL

    pruner = par_demo.load(Path(DEFAULT_MODEL))
    assert pruner.family == "llava" and pruner.predictor.loaded.name == DEFAULT_MODEL
    with pytest.raises(par_demo.UserError, match="the model must be a name, hub id or folder path, got 123"):
        par_demo.load(123)
