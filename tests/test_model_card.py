"""The model card on the page: a name (never a path), the family and size, what the model was trained on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from par_demo.model_card import card_for
from par_demo.models import DEFAULT_MODEL
from par_demo.panels import model_card_markdown
from par_demo.shapes import QUESTION_TYPES


def test_the_embedded_model_says_it_knows_synthetic_shape_scenes_only():
    from par_demo.models import load_model

    card = card_for(load_model(DEFAULT_MODEL, device="cpu"))
    assert card.name == "ShapesVQA LLaVA" and card.source == "embedded" and card.synthetic_only
    assert (card.visual_tokens, card.layers) == (576, 12) and "24×24" in card.family  # LLaVA-1.5's grid
    assert 3e6 < card.parameters < 4e6
    assert [kind for kind, _ in card.question_types] == list(QUESTION_TYPES)
    text = model_card_markdown(card)
    assert "synthetic shape scenes only" in text and "How many objects are there?" in text
    assert str(Path(DEFAULT_MODEL).parent) not in text  # a name, not a machine path


def test_a_hub_model_shows_its_hub_id_and_quantization(tiny):
    card = card_for(dataclasses.replace(tiny, name="llava-hf/llava-1.5-7b-hf", quant="4bit"))
    assert card.hub_id == "llava-hf/llava-1.5-7b-hf" and not card.synthetic_only
    text = model_card_markdown(card)
    assert "`llava-hf/llava-1.5-7b-hf` on the Hugging Face hub" in text and "4-bit NF4" in text
    assert "https://huggingface.co/llava-hf/llava-1.5-7b-hf" in text  # no card in the cache: where to read it


def test_random_weights_say_their_answers_mean_nothing(tiny):
    card = card_for(tiny)
    assert card.name == "random:llava-tiny" and "random weights" in card.trained_on
    assert "LLaVA (CLIP tower" in model_card_markdown(card)
