"""The command line: stable JSON for scripts, one clear line (no traceback) for bad input."""

import json
import subprocess
import sys

import pytest

from par_demo.cli import main

TINY = ["--model", "random:llava-tiny", "--device", "cpu"]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory, scene):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    scene.save(path)
    return str(path)


def test_predict_json_is_one_object_with_the_documented_keys(image_file, capsys):
    code = main(["predict", *TINY, "--image", image_file, "--question", "How many objects are there?",
                 "--method", "fastv", "--budget", "0.5", "--max-new-tokens", "3", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("answer", "method", "budget", "flops", "flops_full", "flops_ratio", "n_visual_tokens",
                "kept_visual_tokens", "n_layers", "kept_layers", "prefill_s", "total_s", "new_tokens"):
        assert key in data
    assert data["method"] == "fastv" and data["flops_ratio"] <= 0.5 and data["n_visual_tokens"] == 144
    timing = data["timing"]  # timed in turns with the full model: rounds, spread, speed-up of the medians
    assert timing["rounds"] == 5 and data["prefill_s"] == timing["prefill_s"]["median"]
    assert timing["prefill_s"]["low"] <= timing["prefill_s"]["median"] <= timing["prefill_s"]["high"]
    assert timing["speedup_bound"] == pytest.approx(1 / data["flops_ratio"])
    assert timing["prefill_speedup"]["low"] <= timing["prefill_speedup"]["median"] <= timing["prefill_speedup"]["high"]


def test_predict_with_a_budget_and_no_method_picks_par_or_says_which_to_choose(image_file, capsys):
    code = main(["predict", *TINY, "--image", image_file, "--question", "What color is the circle?",
                 "--budget", "0.5", "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1  # the tiny model has no router: one line that names the other methods
    assert "par is unavailable" in err[0] and "--method: fastv, random, layerdrop" in err[0]


def test_a_budget_without_a_method_means_par_when_it_is_available():
    from types import SimpleNamespace

    from par_demo.predict import choose_method

    with_router = SimpleNamespace(method=lambda name: SimpleNamespace(available=lambda: None))
    assert choose_method(with_router, None, 0.3, None, None) == "par"
    assert choose_method(with_router, None, 1.0, None, 20) == "par"  # --layers alone also asks for pruning
    assert choose_method(with_router, None, 1.0, None, None) == "full"
    assert choose_method(with_router, "fastv", 0.3, None, None) == "fastv"


def test_bench_json_rows_carry_speedups_and_efficiency(capsys):
    code = main(["bench", *TINY, "--methods", "full,fastv", "--budgets", "0.5", "--repeats", "1",
                 "--new-tokens", "2", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    rows = {(r["method"], r["budget"]): r for r in data["rows"]}
    assert set(rows) == {("full", 1.0), ("fastv", 0.5)}
    fastv = rows[("fastv", 0.5)]
    for key in ("flops_ratio", "prefill_s", "total_s", "speedup_prefill", "speedup_total", "efficiency",
                "peak_mem_mb", "kv_cache_mb", "decode_tok_s"):
        assert key in fastv
    assert fastv["efficiency"] == pytest.approx(fastv["speedup_prefill"] * fastv["flops_ratio"])
    assert rows[("full", 1.0)]["speedup_prefill"] == 1.0
    assert data["environment"]["cpu"]  # CPU figures differ by several times between machines: say which one


BAD_INPUT = [
    (["--image", "/nonexistent.png"], "not found"),
    (["--question", "   "], "question is empty"),
    (["--budget", "0"], "(0, 1]"),
    (["--budget", "1.5"], "(0, 1]"),
    (["--method", "magic"], "unknown method"),
    (["--image", "NOT_AN_IMAGE"], "not an image"),
    (["--model", "../etc"], "model"),
]


def predict_argv(image_file, tmp_path, args):
    base = {"--image": image_file, "--question": "What color is the circle?", "--method": "full",
            "--budget": "1.0", "--model": "random:llava-tiny", "--device": "cpu"}
    if args[1] == "NOT_AN_IMAGE":
        fake = tmp_path / "fake.png"
        fake.write_text("this is text, not a PNG")
        args = [args[0], str(fake)]
    base.update(dict(zip(args[::2], args[1::2])))
    return ["predict"] + [item for pair in base.items() for item in pair]


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_predict_input_exits_nonzero_with_one_line(image_file, tmp_path, capsys, args, message):
    code = main(predict_argv(image_file, tmp_path, args))
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_bad_input_shows_no_traceback_from_the_real_process(image_file, tmp_path):
    argv = [sys.executable, "-m", "par_demo"] + predict_argv(image_file, tmp_path, ["--image", "NOT_AN_IMAGE"])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "error: 'fake.png' is not an image" in result.stderr
    assert "torchvision" not in result.stderr  # the model loads with no false alarm either


def test_help_prints_no_torchvision_warning():
    """The first line a user sees is the usage, not transformers' "torchvision not installed" fallback notice."""
    result = subprocess.run([sys.executable, "-m", "par_demo", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage:")
    assert "torchvision" not in result.stderr + result.stdout


def test_offline_hub_miss_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["bench", "--model", "nobody/no-such-model-here", "--methods", "full", "--repeats", "1"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot load model 'nobody/no-such-model-here'")


def test_eval_table_shows_how_many_samples_each_type_accuracy_rests_on():
    from par_demo.evaluate import EvalRow, format_table

    row = EvalRow("fastv", 0.5, accuracy=0.9, flops_ratio=0.49, n=30, by_type={"color": 0.95, "where": 0.5},
                  n_by_type={"color": 20, "where": 10})
    line = format_table([row]).splitlines()[2]
    assert "95.0% (20)" in line and "50.0% (10)" in line


def test_eval_with_a_fixed_token_count_runs_the_full_reference_and_notes_the_methods_that_take_no_tokens(
        tmp_path, capsys):
    assert main(["make-shapes", str(tmp_path / "d"), "--n", "3", "--seed", "4"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", "random:llava-tiny", "--data", str(tmp_path / "d" / "data.jsonl"), "--tokens", "9",
                 "--max-new-tokens", "1", "--json"]) == 0  # the default methods: full, fastv, random, layerdrop
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    rows = {r["method"]: r for r in listed}
    assert len(listed) == 4  # one row per method: the count takes the place of the budgets (0.25, 0.5 by default)
    assert rows["fastv"]["tokens"] == 9 and rows["full"]["tokens"] is None
    assert rows["full"]["n"] == 3 and rows["full"]["flops_ratio"] == 1.0  # the reference runs unpruned
    assert rows["fastv"]["n"] == 3 and rows["random"]["flops_ratio"] < 1.0
    assert "layerdrop does not prune tokens" in rows["layerdrop"]["note"]
    assert rows["layerdrop"]["accuracy"] is None and rows["layerdrop"]["flops_ratio"] is None  # JSON null, not NaN


def test_eval_rows_not_evaluated_say_the_budget_unit_they_were_refused_in(tmp_path):
    from PIL import Image

    from par_demo.errors import UserError
    from par_demo.evaluate import evaluate

    class Refusing:
        def predict(self, *args, **kwargs):
            raise UserError("budget 0.1 is below what fastv can reach on this model")

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    sample = {"image": str(tmp_path / "a.png"), "question": "What color?", "answer": "red"}
    (row,) = evaluate(Refusing(), [sample], [("fastv", 0.1)], budget_unit="time")
    assert row.budget_unit == "time" and row.accuracy is None and "below what fastv can reach" in row.note


def test_a_reader_that_leaves_early_ends_the_command_without_a_traceback(tmp_path):
    """`python -m par_demo ... --json | head`: head closes the pipe after its lines."""
    import shlex
    import subprocess

    script = ("import sys\nfrom par_demo import cli, shapes\n"
              "shapes.run = lambda args: [print('{\"row\": %d}' % i) for i in range(200000)] and 0\n"
              "sys.exit(cli.main(['make-shapes', 'unused']))\n")
    done = subprocess.run(f"{sys.executable} -c {shlex.quote(script)} | head -n 1", shell=True, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.stdout == '{"row": 0}\n' and "Traceback" not in done.stderr and "Error" not in done.stderr


@pytest.mark.parametrize("command, message", [
    (["make-shapes", "{tmp}/data.jsonl", "--n", "6"], "is a file: give the folder"),
    (["make-shapes", "{tmp}/new", "--seed", "-1"], "--seed must be 0 or more"),
    (["predict", "--model", "random:llava-tiny", "--image", "{tmp}", "--question", "q?"], "is a folder: give one image"),
    (["eval", "--model", "random:llava-tiny", "--data", "{tmp}"], "is a folder: give the data file in it"),
    (["train-base", "--out", "{tmp}/m", "--pool-size", "20"], "--pool-size must be at least 512 + --a-batch (576)"),
    (["train-base", "--out", "{tmp}/m", "--threads", "0"], "--threads 0: the batches"),
    (["train-base", "--out", "{tmp}/m", "--a-steps", "-1"], "--a-steps -1: the batches"),
    (["train-router", "--model", "random:llava-tiny", "--data", "{tmp}/data.jsonl", "--out", "{tmp}/nothing",
      "--resume"], "--resume: {tmp}/nothing holds no router to continue"),
    (["train-router", "--model", "random:llava-tiny", "--data", "{tmp}/data.jsonl", "--out", "{tmp}/r", "--seed",
      "-2"], "--seed must be 0 or more"),
])
def test_command_line_mistakes_are_one_error_line(tmp_path, capsys, command, message):
    (tmp_path / "data.jsonl").write_text('{"image": "a.png", "question": "what color?"}\n')
    assert main([part.format(tmp=tmp_path) for part in command]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message.format(tmp=tmp_path) in err and "\n" not in err, err


def test_lmms_task_given_a_folder_writes_the_task_file_into_it(tmp_path, capsys):
    assert main(["make-shapes", str(tmp_path / "d"), "--n", "6"]) == 0
    assert main(["lmms-task", str(tmp_path / "d" / "data.jsonl"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "shapesvqa.yaml").is_file()


def test_eval_refuses_missing_images_before_it_runs_and_a_run_that_evaluated_nothing_is_an_error(tmp_path, capsys):
    assert main(["make-shapes", str(tmp_path / "d"), "--n", "3", "--seed", "4"]) == 0
    data = tmp_path / "d" / "data.jsonl"
    common = ["eval", "--model", "random:llava-tiny", "--data", str(data), "--max-new-tokens", "1"]
    assert main(common + ["--methods", "layerdrop", "--tokens", "9"]) == 2  # layer drop takes no token count
    out, err = capsys.readouterr()
    assert "not evaluated" in out and err.strip() == "error: no setting could be evaluated (each row says why)"
    (tmp_path / "d" / "images" / "000002.png").unlink()
    assert main(common + ["--methods", "fastv"]) == 2
    assert "1 of the 3 images in" in capsys.readouterr().err
