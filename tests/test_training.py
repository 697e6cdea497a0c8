"""Router training at scale: batched flows, the photo-folder question bank, --max-minutes, two processes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from par_demo.methods.absorb import absorbed_sizes
from par_demo.training.flows import Flow, score_flows
from par_demo.training.questions import PROBES, QuestionBank, TEMPLATES, mentions_in

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ("What shape is the red object?", "How many objects are there?", "Is there a blue square in it?")


@pytest.fixture(scope="module")
def targets(predictor, tmp_path_factory):
    from par_demo.shapes import render_scene
    from par_demo.training.targets import make_target

    folder = tmp_path_factory.mktemp("scenes")
    out = []
    for i, question in enumerate(QUESTIONS):  # prompts of different lengths
        image, _ = render_scene(np.random.default_rng(i))
        image.save(folder / f"{i}.png")
        out.append(make_target(predictor, str(folder / f"{i}.png"), question, start_layer=2, max_new_tokens=3))
    return out


def random_flows(targets, start_layer, seed=0, absorb=False):
    """Flows of every kind: all tokens kept or few, no layer or several skipped (before K too, when K > 0); with
    `absorb`, the dropped tokens absorbed by their look-alikes (proportional attention)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t in targets:
        n_v = t.visual.shape[0]
        for j in range(4):
            tokens = int(torch.randint(3, n_v, (1,), generator=g)) if j else n_v
            keep = torch.randperm(n_v, generator=g)[:tokens] if j else None
            skip = [frozenset(), frozenset({3, 5}), frozenset({1, 6}), frozenset({2})][j]
            sizes = absorbed_sizes(t.visual, keep) if absorb and keep is not None else None
            rows.append((t, Flow(keep, skip, tokens, 8 - len(skip), sizes)))
    return rows


@pytest.mark.parametrize("start_layer", [0, 2])
@pytest.mark.parametrize("absorb", [False, True])
def test_batched_flow_losses_equal_the_unbatched_ones(predictor, targets, start_layer, absorb):
    rows = random_flows(targets, start_layer, absorb=absorb)
    alone = score_flows(predictor.engine, rows, start_layer, batched=False)  # each flow through engine.prefill
    for batch_rows in (len(rows), 5):  # one forward for every flow of every query; and uneven chunks
        batched = score_flows(predictor.engine, rows, start_layer, batch_rows=batch_rows)
        assert [a for _, a in batched] == [a for _, a in alone]
        np.testing.assert_allclose([kl for kl, _ in batched], [kl for kl, _ in alone], atol=1e-4, rtol=0)
    assert max(kl for kl, _ in alone) > 1e-3  # the flows do differ from the full model: the test can fail


def test_a_step_split_between_processes_has_the_gradient_of_the_whole_step(predictor, targets, monkeypatch):
    """Data parallel: each process backpropagates its queries' part of the step's loss (a sum over queries, / batch)
    and the gradients are summed, so any split of a step's queries (2 + 1 here, as two processes or micro-batches)
    gives the gradient of the step taken whole, also when queries have different numbers of budgets to learn from
    (the first query's first budget gets a single flow here, so it has no preference pair)."""
    import par_demo.training.loop as loop
    from par_demo.router import MetaRouter, RouterConfig, fingerprint
    from par_demo.training.flows import Budgeter
    from par_demo.training.loop import TrainConfig, batch_loss, new_stats

    stock, calls = loop.sample_flows, []

    def fewer_for_the_first(target, *args, **kwargs):
        flows = stock(target, *args, **kwargs)
        calls.append(target is targets[0])
        return flows[:1] if calls[-1] and sum(calls) % 2 == 1 else flows  # its first budget of every step

    monkeypatch.setattr(loop, "sample_flows", fewer_for_the_first)

    config = RouterConfig(lm_width=128, n_layers=8, width=16, heads=1, model=fingerprint(predictor.loaded))
    train = TrainConfig(flows=4, budgets_per_query=2, batch=len(targets), budget_low=0.3, budget_high=0.8)
    budgeter = Budgeter(predictor.flops, config)
    torch.manual_seed(0)
    router = MetaRouter(config)

    def gradients(chunks):
        generator = torch.Generator().manual_seed(0)  # the same draws whatever the split: query by query
        router.zero_grad()
        for chunk in chunks:
            loss, _ = batch_loss(router, chunk, train, budgeter, predictor.engine, torch.ones(8), 0.5, generator,
                                 new_stats())
            (loss / train.batch).backward()
        return [p.grad.clone() for p in router.parameters()]

    whole, split = gradients([targets]), gradients([targets[:2], targets[2:]])
    assert any(bool(g.abs().sum() > 0) for g in whole)
    for a, b in zip(whole, split):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


def test_the_target_distribution_is_the_teacher_forced_full_model(predictor, targets):
    from par_demo.engine import PruningPlan

    t = targets[0]
    logits = predictor.engine.prefill(t.query, PruningPlan(), n_logits=t.m).logits.reshape(t.m, -1)
    torch.testing.assert_close(t.log_p, torch.log_softmax(logits, -1), atol=1e-4, rtol=0)
    assert t.answer == logits.argmax(-1).tolist()


def test_the_question_bank_asks_about_what_the_model_mentioned():
    said = {"Describe the image in one sentence.": "A red bicycle next to a tree.",
            "What objects are in this image?": "bicycle, tree", "What is the main object in this image?": "bicycle",
            "What color is the main object?": "red"}
    asked = []

    def answer(image, question):
        asked.append((image, question))
        return said[question]

    bank = QuestionBank(answer, seed=0)
    mentions = bank.mentions_of("a.jpg")
    assert mentions.objects == ["bicycle", "tree"] and mentions.colors == ["red"]
    questions = [bank.question("a.jpg", slot) for slot in range(200)]
    assert len(asked) == len(PROBES)  # the model is probed once per image
    assert bank.question("a.jpg", 7) == questions[7]  # the same query asks the same question (resume, processes)
    assert len(set(questions)) > 40  # varied
    assert any("bicycle" in q for q in questions) and any("red" in q for q in questions)
    for kind, needle in [("count", "How many"), ("text", "text"), ("positions", "left"), ("yes/no", "Is there")]:
        assert any(needle in q for q in questions), kind
    assert not any("{" in q for q in questions)
    # with nothing mentioned, only templates without an object or colour slot are used
    assert mentions_in(["the", "it is"]).objects == []
    empty = QuestionBank(lambda image, q: "", seed=0)
    plain = [re.escape(t).replace(r"\{o\}", r"\w+").replace(r"\{d\}", r"\w+")
             for kind in TEMPLATES.values() for t in kind if "{x}" not in t and "{c}" not in t]
    for q in (empty.question("b.png", s) for s in range(50)):
        assert any(re.fullmatch(t, q) for t in plain), q


def test_train_router_from_photos_only_stops_in_time_and_resumes(tmp_path, scene, capsys):
    from par_demo.cli import main

    photos = tmp_path / "photos" / "holiday"
    photos.mkdir(parents=True)
    scene.save(photos / "a.png")
    scene.convert("RGB").save(photos / "b.jpg")
    (photos / "notes.txt").write_text("not a photo")
    out = tmp_path / "router"
    common = ["train-router", "--model", "random:llava-tiny", "--device", "cpu", "--images", str(tmp_path / "photos"),
              "--out", str(out), "--batch", "2", "--grad-accum", "2", "--flows", "3", "--budgets-per-query", "1",
              "--max-new-tokens", "2", "--val", "1", "--pareto-low", "0.5", "--pareto-high", "0.5", "--width", "16"]
    # --max-minutes: stops after the first step that ends past the limit, saves, and still measures the table
    assert main(common + ["--steps", "50", "--max-minutes", "0.0001"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["stopped_early"] and summary["steps"] == 1 and summary["flows"] > 0 and summary["pareto"]
    meta = json.loads((out / "router.json").read_text())
    assert meta["training"]["steps"] == 1 and meta["pareto"]
    # resumed with another learning rate and width: the rate is this run's, the saved router keeps its shape
    resumed = [a if a != "16" else "32" for a in common] + ["--steps", "2", "--resume", "--lr", "5e-4"]
    assert main(resumed) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["steps"] == 2 and not summary["stopped_early"]
    assert "the saved router keeps its shape: width 16 (not 32)" in captured.err
    assert torch.load(out / "train_state.pt")["optimizer"]["param_groups"][0]["lr"] == 5e-4
    # a run stopped after router.json was written and before the optimizer state: the count goes on from router.json
    state = torch.load(out / "train_state.pt")
    torch.save({**state, "step": 1}, out / "train_state.pt")
    assert main(resumed) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    history = [row["step"] for row in json.loads((out / "router.json").read_text())["training"]["history"]]
    assert history == sorted(set(history))  # no step trained twice
    assert main(["train-router", "--images", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    # a new run into a folder that holds a finished router (no training state): said, and the router replaced
    (out / "train_state.pt").unlink()
    assert main(common + ["--steps", "1"]) == 0
    captured = capsys.readouterr()
    assert "holds a router: this run trains a new one and replaces it" in captured.err
    assert json.loads(captured.out)["steps"] == 1  # not the old run's count carried on


def test_two_processes_train_with_summed_gradients_and_end_with_the_same_router(tmp_path, scene):
    """`accelerate launch` with two CPU processes (accelerate 1.x starts one process on a machine without GPUs unless
    given --multi_gpu; --cpu cannot be combined with it, the command's --device cpu places the model)."""
    for i in range(3):
        scene.rotate(90 * i).save(tmp_path / f"{i}.png")
    out = tmp_path / "router"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "par_demo", "train-router", "--model", "random:llava-tiny", "--device", "cpu",
               "--images", str(tmp_path), "--out", str(out), "--steps", "2", "--batch", "2", "--flows", "3",
               "--budgets-per-query", "1", "--max-new-tokens", "2", "--val", "1", "--pareto-low", "0.5",
               "--pareto-high", "0.5", "--width", "16"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["processes"] == 2 and summary["replicas_agree"] and summary["steps"] == 2
    assert json.loads((out / "router.json").read_text())["pareto"]


def test_a_prior_share_keeps_that_share_of_flows_around_the_prior_after_warm_up():
    from par_demo.training.loop import TrainConfig, router_share

    plain, shared = TrainConfig(warmup=10), TrainConfig(warmup=10, prior_share=0.3)
    assert [router_share(s, plain) for s in (0, 5, 10, 500)] == [0.0, 0.5, 1.0, 1.0]
    assert [router_share(s, shared) for s in (0, 5, 10, 500)] == pytest.approx([0.0, 0.5, 0.7, 0.7])


def test_processes_waiting_while_the_main_one_measures_the_table_do_not_time_out():
    # the Pareto table runs on the main process alone; a 256-wide model's took over the process group's default
    # 30 minutes, and the waiting process's barrier timed out and killed the run before the table was saved
    from datetime import timedelta

    from par_demo.training.loop import TrainConfig, make_accelerator

    assert make_accelerator(TrainConfig(), "cpu").init_handler.timeout >= timedelta(hours=12)


def test_a_held_out_photo_has_none_of_its_questions_in_training():
    from par_demo.training.loop import split_held_out
    from par_demo.training.questions import QuerySpec

    queries = [QuerySpec(f"{image}.png", None, slot) for image in range(8) for slot in range(2)]  # 16 queries
    held, trained = split_held_out(queries, val=3)  # 3 would split the second photo's two questions
    assert [q.image for q in held] == ["0.png", "0.png", "1.png", "1.png"]
    assert not {q.image for q in held} & {q.image for q in trained} and len(held) + len(trained) == 16
    lines = [QuerySpec(f"{i}.png", "q?") for i in range(10)]  # a question file: one image a line, as before
    assert [len(part) for part in split_held_out(lines, val=96)] == [2, 8]


def test_train_router_refuses_a_width_its_heads_do_not_divide(tmp_path, capsys):
    from par_demo.cli import main

    assert main(["train-router", "--data", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "r"),
                 "--width", "52"]) == 2
    assert "--width must be a multiple of 4, at least 4, that its heads" in capsys.readouterr().err
