"""Widening a trained LLaVA's decoder (`par_demo/widen.py`, `train-base --grow-from`) keeps what it computes, and
refuses anything but a wider decoder."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from par_demo.errors import UserError
from par_demo.widen import widen_into


def tiny_llava(width=32, heads=2, mlp=64, layers=3, seed=0) -> LlavaForConditionalGeneration:
    from par_demo.shapes import IMAGE_SIZE
    from par_demo.tokenizer import build_processor
    from par_demo.base_training.config import ModelConfig
    from par_demo.base_training.model import build_model

    torch.manual_seed(seed)
    processor = build_processor(IMAGE_SIZE, 16)
    config = ModelConfig(vision_width=32, vision_layers=1, text_width=width, text_heads=heads, text_mlp=mlp,
                         text_layers=layers)
    return build_model(config, processor).eval()


def randomise(model) -> None:
    """Trained-looking weights: norms and biases away from their 1 / 0 initialisation too."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def test_widened_model_computes_the_same_logits_and_trains_its_new_dimensions():
    narrow = tiny_llava()
    randomise(narrow)
    wide = tiny_llava(width=64, heads=4, mlp=256, seed=1)
    widen_into(narrow, wide)
    ids = torch.randint(5, 40, (1, 160))
    ids[0, 2:146] = narrow.config.image_token_id  # 12 x 12 patches
    pixels = torch.randn(1, 3, 192, 192)
    with torch.no_grad():
        want = narrow(input_ids=ids, pixel_values=pixels).logits
        got = wide(input_ids=ids, pixel_values=pixels).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert wide.config.text_config.hidden_size == 64
    # the new residual dimensions and units are not dead: training reaches their weights
    wide.train()
    wide(input_ids=ids, pixel_values=pixels).logits[0, -1].logsumexp(-1).backward()
    layer = wide.model.language_model.layers[1]
    assert layer.mlp.down_proj.weight.grad[32:].abs().sum() > 0  # rows writing the new dimensions
    assert layer.self_attn.o_proj.weight.grad[:, 32:].abs().sum() > 0  # columns reading the new heads


def test_widening_refuses_a_narrower_or_different_model():
    narrow = tiny_llava()
    with pytest.raises(UserError, match="not narrow it"):
        widen_into(tiny_llava(width=64, heads=4, mlp=256), narrow)
    with pytest.raises(UserError, match="layers"):
        widen_into(narrow, tiny_llava(width=64, heads=4, mlp=256, layers=4))
    other = copy.deepcopy(narrow)
    other.config.text_config.num_attention_heads = 4  # 2 key/value heads: groups of 2 query heads instead of 1
    with pytest.raises(UserError, match="same factor"):
        widen_into(narrow, other)


def test_train_base_grows_a_saved_model_wider(tmp_path, capsys):
    from par_demo.cli import main

    small = ["--pool-size", "516", "--a-steps", "1", "--a-batch", "4", "--b-steps", "1", "--b-batch", "1",
             "--b-questions", "6", "--eval-every", "1", "--eval-per-type", "1", "--final-per-type", "1", "--warmup",
             "1", "--vision-width", "32", "--vision-layers", "1", "--text-layers", "3", "--text-mlp", "128"]
    assert main(["train-base", "--out", str(tmp_path / "narrow"), "--work", str(tmp_path / "w1"), *small]) == 0
    wider = [*small[:-2], "--text-mlp", "256", "--text-width", "256", "--text-heads", "8"]
    assert main(["train-base", "--out", str(tmp_path / "wide"), "--work", str(tmp_path / "w2"),
                 "--grow-from", str(tmp_path / "narrow"), *wider]) == 0
    log = (tmp_path / "w2" / "log.txt").read_text()
    assert "widened" in log and "stage A step" not in log and "stage B step 1" in log
    wide = LlavaForConditionalGeneration.from_pretrained(tmp_path / "wide", local_files_only=True)
    assert wide.config.text_config.hidden_size == 256
    assert main(["train-base", "--out", str(tmp_path / "x"), "--work", str(tmp_path / "w3"),
                 "--grow-from", str(tmp_path / "wide"), *small]) == 2
    assert "not narrow it" in capsys.readouterr().err
