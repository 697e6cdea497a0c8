"""Model loading: local folders, random presets, bitsandbytes quantization on CPU, clear errors."""

import pytest
import torch

from par_demo.errors import UserError
from par_demo.models import load_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("tiny-llava")
    tiny.model.save_pretrained(folder)
    tiny.processor.save_pretrained(folder)
    return folder


def test_local_folder_loads_offline_and_answers_like_the_original(tiny_folder, tiny, predictor, scene):
    from par_demo.predict import Predictor

    reloaded = Predictor(load_model(str(tiny_folder), device="cpu"))
    a = reloaded.predict(scene, "What color is the circle?", "fastv", 0.5, max_new_tokens=4)
    b = predictor.predict(scene, "What color is the circle?", "fastv", 0.5, max_new_tokens=4)
    assert a.answer == b.answer and a.kept_visual_tokens == b.kept_visual_tokens


def test_4bit_quantizes_the_decoder_but_not_vision_projector_or_head(tiny_folder, scene):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from par_demo.predict import Predictor

    loaded = load_model(str(tiny_folder), quant="4bit", device="cpu")
    model = loaded.model
    assert isinstance(model.model.language_model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert isinstance(model.model.language_model.layers[-1].mlp.down_proj, bnb.nn.Linear4bit)
    assert type(model.lm_head) is torch.nn.Linear
    assert type(model.model.multi_modal_projector.linear_1) is torch.nn.Linear
    assert type(model.model.vision_tower.encoder.layers[0].mlp.fc1) is torch.nn.Linear
    result = Predictor(loaded).predict(scene, "How many objects are there?", "fastv", 0.5, max_new_tokens=3)
    assert result.new_tokens >= 1 and result.flops_ratio <= 0.5


def test_random_preset_is_deterministic(tiny):
    again = load_model("random:llava-tiny", device="cpu")
    for a, b in zip(tiny.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)


def test_small_presets_are_drawn_on_the_cpu_and_large_ones_where_they_will_run():
    """The shipped routers' fingerprints need a mid preset's weights alike on every machine; a 7B preset drawn on a
    CPU would spend minutes of a GPU lease. The meta device stands in for the GPU (nothing is allocated)."""
    from par_demo.models import build_random_model

    small, _, _ = build_random_model("llava-tiny", device="meta")
    assert {p.device.type for p in small.parameters()} == {"cpu"}
    large, _, _ = build_random_model("llava-1.5-7b", dtype=torch.bfloat16, device="meta")
    assert {p.device.type for p in large.parameters()} == {"meta"}


@pytest.mark.parametrize("spec, message", [
    ("random:no-such-preset", "unknown preset"),
    ("", "no model"),
    ("not a model id", "neither a local model folder"),
    ("/tmp", "no config.json"),
])
def test_bad_model_specs_are_refused(spec, message):
    with pytest.raises(UserError, match=message):
        load_model(spec, device="cpu")


def test_unknown_quantization_is_refused():
    with pytest.raises(UserError, match="quantization"):
        load_model("random:llava-tiny", quant="3bit", device="cpu")


def test_a_folder_with_truncated_or_mismatched_weights_is_one_clear_line(tiny_folder, tmp_path):
    import shutil

    truncated = shutil.copytree(tiny_folder, tmp_path / "truncated")
    with open(truncated / "model.safetensors", "r+b") as weights:
        weights.truncate(100)  # a download cut short
    with pytest.raises(UserError, match="cannot load model .* from its local folder") as refused:
        load_model(str(truncated), device="cpu")
    assert "\n" not in str(refused.value)
    other = shutil.copytree(tiny_folder, tmp_path / "other")
    config = (other / "config.json").read_text()
    (other / "config.json").write_text(config.replace('"intermediate_size": ', '"intermediate_size": 1', 1))
    with pytest.raises(UserError, match="cannot load model"):  # weights of another shape than the config says
        load_model(str(other), device="cpu")


def test_loading_a_preset_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("random:llava-tiny", device="cpu")  # its weights are drawn from their own seed
    assert torch.equal(torch.rand(3), expected)


def test_an_unsupported_decoder_variant_is_refused_from_its_config_before_any_weight_is_read(tmp_path):
    """InternVL with a Qwen3 decoder (q/k norms the engine's layer loop does not run): the folder holds only a
    config.json, so the refusal cannot come from loading weights or a processor."""
    from transformers import Qwen3Config

    from par_demo.families import preset_families

    config, _ = preset_families()["internvl3-tiny"].build_random("internvl3-tiny")
    text = config.text_config
    config.text_config = Qwen3Config(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, head_dim=text.hidden_size // text.num_attention_heads)
    config.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="unsupported decoder layer Qwen3DecoderLayer"):
        load_model(str(tmp_path), device="cpu")


def test_a_gpu_that_only_emulates_bf16_trains_the_router_without_autocast(monkeypatch):
    """torch says bf16 is supported on a T4 too (emulated, slowly): the router's autocast asks for it in hardware."""
    from par_demo.training.loop import mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert mixed_precision("auto", "cuda") == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere on
    assert mixed_precision("auto", "cuda") == "bf16"


def test_the_start_up_line_says_where_the_model_runs():
    from par_demo.models import load_model

    line = load_model("random:llava-tiny", device="cpu").placement()
    assert line == f"cpu ({torch.get_num_threads()} threads; torch {torch.__version__}), float32"


def test_a_dtype_is_read_in_any_case_or_as_a_torch_dtype_and_others_are_one_line():
    from par_demo.errors import UserError
    from par_demo.models import parse_dtype

    assert parse_dtype("BF16", "cpu") == parse_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    assert parse_dtype("Auto", "cpu") == parse_dtype(None, "cpu") == torch.float32
    with pytest.raises(UserError, match="unknown dtype 'torch.int8'; choose one of: auto, fp32, bf16, fp16"):
        parse_dtype(torch.int8, "cpu")
