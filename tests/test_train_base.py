"""train-base (`par_demo/base_training/`): its supervision targets are right, its packed batches equal separate
sequences, and the command trains, saves a loadable LLaVA and resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from par_demo.base_training.config import ModelConfig
from par_demo.base_training.held_out import held_out
from par_demo.base_training.model import build_model, to_pixels, vision_features
from par_demo.base_training.packing import READ_SIZES, QuestionPacker, read_target
from par_demo.base_training.scenes import COLOR_NAMES, IGNORE, make_pool, patch_labels
from par_demo.base_training.stage_b import LOOK_LAYER, dropped_layers, packed_loss, skippable_layers
from par_demo.shapes import IMAGE_SIZE
from par_demo.tokenizer import build_processor


def obj(shape, color, x, y, s=30):
    return {"shape": shape, "color": color, "box": (x, y, x + s, y + s), "center": (x + s / 2, y + s / 2)}


I = IGNORE
SCENE = [obj("circle", "red", 10, 10), obj("square", "blue", 120, 130), obj("triangle", "red", 130, 10)]


@pytest.mark.parametrize("qtype, question, expected", [
    ("color", "What color is the square?", [3, 2, 4, I]),  # blue square, bottom right
    ("shape", "What shape is the blue object?", [3, 2, 4, I]),
    ("exists", "Is there a red triangle?", [1, 3, 2, I]),  # top right
    ("exists", "Is there a green circle?", [0, 0, 0, I]),  # nothing to read: "no"
    ("where", "Where is the red circle?", [1, 1, 1, I]),
    ("count_all", "How many objects are there?", [I, I, I, 3]),
    ("count_shape", "How many circles are there?", [I, I, I, 1]),
    ("count_shape", "How many squares are there?", [I, I, I, 1]),
])
def test_read_targets_name_the_object_the_question_is_about(qtype, question, expected):
    assert read_target(qtype, question, SCENE) == expected


def test_look_targets_cover_the_asked_object_and_sum_to_one():
    processor = build_processor(IMAGE_SIZE, 16)
    packer = QuestionPacker(processor, 6)
    labels = patch_labels(SCENE)
    look = packer.look_target("color", "What color is the square?", labels)
    assert look.sum() == pytest.approx(1.0)
    image = look[packer.image_start:packer.image_start + 144]
    assert (labels[image > 0, 1] == 2).all() and (image > 0).sum() >= 2  # square patches only
    nothing = packer.look_target("exists", "Is there a green circle?", labels)
    assert nothing[0] == pytest.approx(1.0)  # all on <s>


def test_packed_questions_equal_separate_sequences():
    torch.manual_seed(0)
    processor = build_processor(IMAGE_SIZE, 16)
    model = build_model(ModelConfig(vision_width=32, vision_layers=1, text_layers=3), processor).eval()
    pool = make_pool(2, seed=5)
    packer = QuestionPacker(processor, 6)
    pos, mask = packer.layout()
    ids, targets, rows, queries, looks, reads = packer.batch(pool, np.arange(2), np.random.default_rng(0))
    # each question's first answer position is supervised; a "where" question's second one too
    n_where = sum(1 for r in range(2) for j in range(6) if ids[r, len(packer.prefix) + j * packer.block_len]
                  == processor.tokenizer.convert_tokens_to_ids("where"))
    assert len(queries) == len(rows) == len(looks) == len(reads) == 12 + n_where
    assert (targets[rows, queries] != IGNORE).all()  # every supervised position predicts an answer token
    with torch.no_grad():
        feats = vision_features(model, to_pixels(pool.images))
        lm = model.model.language_model
        embeds = lm.embed_tokens(ids)
        s = packer.image_start
        embeds = torch.cat([embeds[:, :s], model.model.multi_modal_projector(feats), embeds[:, s + 144:]], 1)
        packed = lm(inputs_embeds=embeds, position_ids=pos.unsqueeze(0).expand(2, -1),
                    attention_mask=mask.view(1, 1, *mask.shape).expand(2, 1, -1, -1)).last_hidden_state
        p, b = len(packer.prefix), packer.block_len
        for j in (0, 5):  # first and last question of image 1, run alone
            alone = torch.cat([embeds[1, :p], embeds[1, p + j * b:p + (j + 1) * b]]).unsqueeze(0)
            out = lm(inputs_embeds=alone).last_hidden_state[0, p:]
            torch.testing.assert_close(out, packed[1, p + j * b:p + (j + 1) * b], atol=1e-4, rtol=1e-4)


def test_train_base_command_saves_a_loadable_model_and_resumes(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from par_demo.cli import main

    args = ["train-base", "--out", str(tmp_path / "model"), "--work", str(tmp_path / "work"), "--pool-size", "520",
            "--a-steps", "2", "--a-batch", "8", "--b-steps", "2", "--b-batch", "2", "--b-questions", "6",
            "--eval-every", "2", "--eval-per-type", "1", "--final-per-type", "1", "--warmup", "1",
            "--vision-width", "32", "--vision-layers", "1", "--text-layers", "5", "--text-mlp", "128"]
    assert main(args) == 0
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "model", local_files_only=True)
    processor = AutoProcessor.from_pretrained(tmp_path / "model", local_files_only=True)
    assert model.config.text_config.num_hidden_layers == 5 and processor.tokenizer is not None
    log = (tmp_path / "work" / "log.txt").read_text()
    assert "stage B step 2" in log
    # the same command again resumes both stages from their checkpoints instead of training anew
    assert main(args) == 0
    log = (tmp_path / "work" / "log.txt").read_text()
    assert "stage A: resumed at step 2" in log and "stage B: resumed at step 2" in log


def test_train_base_refuses_a_model_too_shallow_for_its_losses(tmp_path, capsys):
    from par_demo.cli import main

    assert main(["train-base", "--out", str(tmp_path / "m"), "--text-layers", "2"]) == 2
    assert "--text-layers must be at least 3" in capsys.readouterr().err


def test_patch_labels_follow_the_grid_of_the_patch_size():
    fine = patch_labels(SCENE, grid=24)  # patch 8: LLaVA-1.5's 24 x 24 grid
    coarse = patch_labels(SCENE)
    assert fine.shape == (576, 4) and coarse.shape == (144, 4)
    assert (fine[:, 2] == 1).sum() == (coarse[:, 2] == 1).sum() == len(SCENE)  # one centre patch per object
    for o in SCENE:  # each object's centre patch carries its colour at both grids
        cx, cy = o["center"]
        assert fine[int(cy // 8) * 24 + int(cx // 8), 2] == 1
        assert fine[int(cy // 8) * 24 + int(cx // 8), 0] == coarse[int(cy // 16) * 12 + int(cx // 16), 0] > 0
    # a fine patch wholly inside an object is that object's, as its coarse patch is
    assert fine[(10 // 8 + 1) * 24 + 10 // 8 + 1, 0] == COLOR_NAMES.index("red") + 1


def test_train_base_trains_a_576_token_model_in_bf16(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from par_demo.cli import main

    args = ["train-base", "--out", str(tmp_path / "model"), "--work", str(tmp_path / "work"), "--pool-size", "516",
            "--a-steps", "1", "--a-batch", "4", "--b-steps", "1", "--b-batch", "1", "--b-questions", "6",
            "--eval-every", "1", "--eval-per-type", "1", "--final-per-type", "1", "--warmup", "1",
            "--vision-width", "32", "--vision-layers", "1", "--text-layers", "3", "--text-mlp", "128",
            "--patch-size", "8", "--bf16"]
    assert main(args) == 0
    assert "'bf16': True" in (tmp_path / "work" / "log.txt").read_text()
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "model", local_files_only=True)
    processor = AutoProcessor.from_pretrained(tmp_path / "model", local_files_only=True)
    assert model.config.image_seq_length == 576 and model.dtype == torch.float32  # saved fp32 all the same
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many objects are there?"}]}],
        add_generation_prompt=True)
    inputs = processor(images=held_out(1, seed=0)[0]["image"], text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576


def test_train_base_refuses_a_patch_size_that_does_not_tile_the_image(tmp_path, capsys):
    from par_demo.cli import main

    assert main(["train-base", "--out", str(tmp_path / "m"), "--patch-size", "10"]) == 2
    assert "--patch-size must divide the 192-px image" in capsys.readouterr().err


def test_train_base_continues_from_a_saved_model_or_its_work_folder_and_refuses_another_architecture(tmp_path, capsys):
    from par_demo.cli import main

    small = ["--pool-size", "516", "--a-steps", "1", "--a-batch", "4", "--b-steps", "1", "--b-batch", "1",
             "--b-questions", "6", "--eval-every", "1", "--eval-per-type", "1", "--final-per-type", "1", "--warmup",
             "1", "--vision-width", "32", "--vision-layers", "1", "--text-layers", "3", "--text-mlp", "128"]
    assert main(["train-base", "--out", str(tmp_path / "first"), "--work", str(tmp_path / "w1"), *small]) == 0
    assert main(["train-base", "--out", str(tmp_path / "second"), "--work", str(tmp_path / "w2"),
                 "--init-from", str(tmp_path / "first"), *small]) == 0
    log = (tmp_path / "w2" / "log.txt").read_text()
    assert "stage A skipped" in log and "stage B step 1" in log and "stage A step" not in log
    assert "carried over" not in log  # a saved model has no read probe: a fresh one
    assert main(["train-base", "--out", str(tmp_path / "fourth"), "--work", str(tmp_path / "w4"),
                 "--init-from", str(tmp_path / "w1"), *small]) == 0  # a work folder: its probe goes on too
    assert "read probe and optimizer moments carried over" in (tmp_path / "w4" / "log.txt").read_text()
    wider = [*small[:-4], "--text-layers", "4", "--text-mlp", "128"]
    assert main(["train-base", "--out", str(tmp_path / "third"), "--work", str(tmp_path / "w3"),
                 "--init-from", str(tmp_path / "first"), *wider]) == 2
    assert "not a model saved with these model flags" in capsys.readouterr().err


def test_layer_drop_leaves_out_only_layers_a_router_may_skip_and_spans_every_depth():
    assert dropped_layers(12, 0.0, np.random.default_rng(0)) == []
    skippable = skippable_layers(12)
    assert 0 not in skippable and 11 not in skippable and LOOK_LAYER not in skippable and len(skippable) == 9
    draws = [dropped_layers(12, 0.8, np.random.default_rng([0, s])) for s in range(300)]
    assert all(set(d) <= set(skippable) and len(set(d)) == len(d) for d in draws)
    assert {len(d) for d in draws} == set(range(8))  # 0 .. round(0.8 * 9) layers, each depth seen


def test_shallow_layer_drop_runs_the_shallowest_depth_about_as_often_as_asked():
    skippable = skippable_layers(12)
    draws = [dropped_layers(12, 1.0, np.random.default_rng([1, s]), shallow=0.5) for s in range(400)]
    shallowest = sum(d == skippable for d in draws) / len(draws)
    assert 0.5 < shallowest < 0.62  # half the steps, plus the uniform draw's tenth of the other half
    assert {len(d) for d in draws} == set(range(10))  # every other depth is still seen
    assert dropped_layers(12, 0.0, np.random.default_rng(0), shallow=1.0) == []  # no LayerDrop, nothing dropped


def test_a_dropped_layer_gets_no_gradient_and_the_model_keeps_every_layer():
    torch.manual_seed(0)
    processor = build_processor(IMAGE_SIZE, 16)
    model = build_model(ModelConfig(vision_width=32, vision_layers=1, text_layers=5, text_mlp=128), processor)
    pool = make_pool(2, seed=5)
    packer = QuestionPacker(processor, 6)
    pos, mask = packer.layout()
    batch = packer.batch(pool, np.arange(2), np.random.default_rng(0))
    read_head = torch.nn.Linear(model.model.language_model.layers[0].self_attn.head_dim, sum(READ_SIZES))
    with torch.no_grad():
        feats = vision_features(model, to_pixels(pool.images))
    losses = {}
    for dropped in ([], [3]):
        model.zero_grad()
        answer, look, read = packed_loss(model, read_head, feats, *batch, pos, mask, packer.image_start, dropped)
        (answer + look + read).backward()
        losses[tuple(dropped)] = answer.item()
        layers = model.model.language_model.layers
        assert len(layers) == 5  # put back after the step
        assert (layers[3].mlp.down_proj.weight.grad is None) == (dropped == [3])
        assert layers[1].mlp.down_proj.weight.grad is not None
    assert losses[()] != losses[(3,)]


def test_train_base_refuses_a_layer_drop_share_outside_0_to_1(tmp_path, capsys):
    from par_demo.cli import main

    assert main(["train-base", "--out", str(tmp_path / "m"), "--layer-drop", "1.5"]) == 2
    assert "--layer-drop and --layer-drop-shallow must be between 0 and 1" in capsys.readouterr().err
    assert main(["train-base", "--out", str(tmp_path / "m"), "--layer-drop-shallow", "-0.1"]) == 2
    assert "(got 0.0, -0.1)" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
