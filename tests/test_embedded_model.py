"""The shipped ShapesVQA checkpoints (144 visual tokens, and LLaVA-1.5's 576) load offline, are small, and still
answer fresh questions correctly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from par_demo.shapes import QUESTION_TYPES, is_correct, sample_example

MODELS = Path(__file__).resolve().parent.parent / "assets" / "models"
VISUAL_TOKENS = {"shapes-llava": 144, "shapes-llava-576": 576}  # 12 x 12 and 24 x 24 patches
TEST_SEED = 90_210  # used by this test only, never for training


@pytest.fixture(scope="module", params=list(VISUAL_TOKENS))
def model_and_processor(request):
    folder = MODELS / request.param
    if not (folder / "config.json").exists():
        pytest.fail(f"the embedded model is missing: {folder}")
    torch.set_num_threads(2)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
    model.folder = folder
    return model, processor


def prompt_for(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def test_checkpoint_is_small_and_sized_for_pruning(model_and_processor):
    model, _ = model_and_processor
    total = sum(f.stat().st_size for f in model.folder.rglob("*") if f.is_file())
    assert total <= 20 * 1024 * 1024, f"checkpoint is {total / 2**20:.1f} MB"
    assert model.config.text_config.num_hidden_layers >= 8
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert grid >= 12


def test_processor_gives_one_image_token_per_patch(model_and_processor):
    model, processor = model_and_processor
    image, _, question, _ = sample_example("count_all", np.random.default_rng(TEST_SEED))
    inputs = processor(images=image, text=prompt_for(processor, question), return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == VISUAL_TOKENS[model.folder.name]
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert prompt_for(processor, question) == f"USER: <image>\n{question} ASSISTANT:"


@torch.no_grad()
def test_fresh_accuracy_with_stock_greedy_generate(model_and_processor):
    model, processor = model_and_processor
    rng = np.random.default_rng(TEST_SEED)
    hits = {t: 0 for t in QUESTION_TYPES}
    per_type = 20
    eos = processor.tokenizer.eos_token_id
    for qtype in QUESTION_TYPES:
        samples = [sample_example(qtype, rng) for _ in range(per_type)]
        # one question type has one prompt length, so the batch needs no padding
        prompts = [prompt_for(processor, q) for _, _, q, _ in samples]
        inputs = processor(images=[s[0] for s in samples], text=prompts, return_tensors="pt", padding=True)
        out = model.generate(**inputs, do_sample=False, max_new_tokens=6)
        new = out[:, inputs["input_ids"].shape[1]:]
        for row, (_, _, _, answer) in zip(new, samples):
            assert eos in row.tolist(), "greedy generation must end at </s>"
            pred = processor.tokenizer.decode(row, skip_special_tokens=True)
            hits[qtype] += is_correct(pred, answer)
    accuracy = sum(hits.values()) / (per_type * len(QUESTION_TYPES))
    # A floor that catches a broken or mis-saved checkpoint (answering from priors alone scores ~30%), with room
    # for the noise of 120 samples below what the shipped checkpoint measures on 1,200 held-out ones
    # (docs/embedded-model.md).
    # Both checkpoints measure 98–99 % on the 1,200 held-out samples.
    assert accuracy >= 0.9, f"accuracy {accuracy:.2f}, per type {hits}"
    assert min(hits.values()) >= 0.75 * per_type, f"a question type collapsed: {hits}"
