"""Tiled families (SmolVLM, InternVL3): tiles are first-class. Every visual token knows its tile, its cell in the
patch view and its place on the whole image; the prompt marks tiles as the stock processors do; --max-tiles trades
tiles for tokens; the patch view shows each tile at its place and the global view beside them; a saved folder
loads offline. Exactness against stock transformers is in test_families.py, FLOPs in test_flops.py."""

import numpy as np
import pytest
import torch

from par_demo.engine import Engine
from par_demo.errors import UserError
from par_demo.shapes import render_scene

QUESTION = "What color is the circle?"


@pytest.fixture(scope="module")
def models():
    from par_demo.models import load_model

    cache = {}

    def get(preset, **options):
        key = (preset, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = load_model(f"random:{preset}", device="cpu", options=options)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def image():
    picture, _ = render_scene(np.random.default_rng(5))
    return picture


def prepared(loaded, picture):
    from par_demo.models import encode_query

    inputs = encode_query(loaded, picture, QUESTION)
    return inputs, Engine(loaded.model).prepare(inputs)


@pytest.mark.parametrize("preset, size, tiles", [
    ("smolvlm-tiny", (200, 100), (2, 3)),  # the long side at 192 px: 3 tiles across, 2 down
    ("smolvlm-tiny", (90, 200), (3, 2)),
    ("internvl3-tiny", (300, 80), (1, 4)),
    ("internvl3-tiny", (160, 160), (2, 2)),
])
def test_every_token_knows_its_tile_its_cell_and_its_place_on_the_image(models, image, preset, size, tiles):
    loaded = models(preset)
    _, query = prepared(loaded, image.resize(size))
    layout = query.layout
    rows, cols = tiles
    assert [t.name for t in layout.tiles] == [f"tile {i},{j}" for i in range(1, rows + 1)
                                              for j in range(1, cols + 1)] + ["global view"]
    per_view = 16
    assert query.n_visual == (rows * cols + 1) * per_view
    assert layout.tile.tolist() == [v for v in range(rows * cols + 1) for _ in range(per_view)]  # tile by tile
    cells = layout.patch_indices(torch.arange(query.n_visual))
    assert len(set(cells)) == query.n_visual and max(cells) < layout.grid[0] * layout.grid[1]  # one cell each
    y, x = layout.centres()
    for index, tile in enumerate(layout.tiles):
        top, left, bottom, right = tile.box
        mine = layout.tile == index
        assert ((y[mine] > top) & (y[mine] < bottom) & (x[mine] > left) & (x[mine] < right)).all()
    # The tiles cover the image exactly: tile tokens sit on a regular (rows x 4) x (cols x 4) grid over it ...
    tile_tokens = layout.tile < rows * cols
    expected_y = sorted({(r + 0.5) / (rows * 4) for r in range(rows * 4)})
    assert torch.allclose(torch.tensor(sorted(set(y[tile_tokens].tolist()))), torch.tensor(expected_y))
    # ... and the global view's token at (r, c) sits where the tile tokens of its part of the image sit on average.
    global_tokens = ~tile_tokens
    gy, gx = y[global_tokens].view(4, 4), x[global_tokens].view(4, 4)
    ty, tx = y[tile_tokens], x[tile_tokens]
    inside = (ty < 0.25) & (tx < 0.25)  # the global view's first cell covers the image's top-left sixteenth
    assert torch.allclose(gy[0, 0], ty[inside].mean()) and torch.allclose(gx[0, 0], tx[inside].mean())


def test_the_prompt_marks_tiles_and_the_global_view_as_the_stock_smolvlm_processor_does(models, image):
    loaded = models("smolvlm-tiny")
    inputs, _ = prepared(loaded, image.resize((200, 100)))
    text = loaded.processor.tokenizer.decode(inputs["input_ids"][0])
    markers = [f"<row_{i}_col_{j}>" for i in (1, 2) for j in (1, 2, 3)]
    positions = [text.index(m) for m in markers]
    assert positions == sorted(positions)  # row by row
    assert text.count("<fake_token_around_image>") == 6 + 2 and text.count("<global-img>") == 1
    assert text.count("<image>") == 7 * 16
    assert "<row_3_col_1>" not in text and "<row_1_col_4>" not in text


def test_internvl_prompt_holds_one_image_block_of_every_view(models, image):
    loaded = models("internvl3-tiny")
    inputs, _ = prepared(loaded, image.resize((160, 160)))
    text = loaded.processor.tokenizer.decode(inputs["input_ids"][0])
    block = text[text.index("<img>"):text.index("</img>")]
    assert block.count("<IMG_CONTEXT>") == 5 * 16 and text.count("<img>") == 1
    assert inputs["pixel_values"].shape[0] == 5  # 4 tiles + the thumbnail


@pytest.mark.parametrize("preset, options, tokens", [
    ("smolvlm-tiny", {}, 160),  # 3 x 3 tiles + the global view
    ("smolvlm-tiny", {"max_tiles": 4}, 80),  # 2 x 2 + the global view
    ("smolvlm-tiny", {"max_tiles": 3}, 16),  # floor(sqrt(3)) = 1 tile per side: the image is not cut
    ("internvl3-tiny", {}, 80),  # 2 x 2 + the thumbnail (6 tiles allowed, a square image takes 4)
    ("internvl3-tiny", {"max_tiles": 3}, 16),  # 1 x 1 fits a square best among 1 x 1, 1 x 2, 1 x 3, ...: one view
    ("internvl3-tiny", {"max_tiles": 1}, 16),  # one view
])
def test_max_tiles_trades_tiles_for_visual_tokens(models, image, preset, options, tokens):
    loaded = models(preset, **options)
    _, query = prepared(loaded, image.resize((160, 160)))
    assert query.n_visual == tokens
    assert query.n_visual <= loaded.max_visual_tokens
    if tokens == 16:
        assert query.layout.tile is None and query.layout.grid == (4, 4)  # one view: a plain grid


def test_the_patch_view_puts_each_tile_at_its_place_and_the_global_view_beside(models):
    from par_demo.predict import Predictor

    loaded = models("smolvlm-tiny")
    picture = np.zeros((100, 200, 3), dtype=np.uint8)
    picture[:, :100] = (255, 0, 0)  # left half red, right half blue
    picture[:, 100:] = (0, 0, 255)
    from PIL import Image

    picture = Image.fromarray(picture)
    predictor = Predictor(loaded)
    view = predictor.model_view(picture)
    p = predictor.predict(picture, QUESTION, "fastv", 1.0, tokens=20, max_new_tokens=1)
    rows, cols = p.grid
    assert (rows, cols) == (8, 17)  # 2 x 3 tiles of 4 x 4 tokens; an empty column; the 4 x 4 global view
    cell_w, cell_h = view.width / cols, view.height / rows
    assert cell_w == cell_h
    pixels = np.asarray(view).astype(int)

    def colour(row, col):
        return pixels[int((row + 0.5) * cell_h), int((col + 0.5) * cell_w)]

    assert colour(0, 0)[0] > 200 and colour(0, 0)[2] < 50  # the first tile is on the red half
    assert colour(7, 11)[2] > 200 and colour(7, 11)[0] < 50  # the last tile is on the blue half
    assert (colour(0, 12) == 255).all() and (colour(7, 12) == 255).all()  # the empty column
    assert colour(0, 13)[0] > 200 and colour(0, 16)[2] > 200  # the global view: red left, blue right
    assert (colour(5, 14) == 255).all()  # below the global view: empty
    assert len(p.kept_visual_tokens) == 20 and all(0 <= i < rows * cols for i in p.kept_visual_tokens)
    scores = p.token_scores
    assert len(scores) == rows * cols and scores[12] is None and scores[0] is not None  # empty cells: no score
    assert len(p.empty_cells) == rows * cols - p.n_visual_tokens and 12 in p.empty_cells and 0 not in p.empty_cells
    # The figure counts visual tokens, not cells, and leaves the empty column as it is (white, not dimmed).
    from par_demo import viz

    figure = viz.patch_figure(view, p.grid, p.kept_visual_tokens, empty=p.empty_cells)
    assert f"kept 20/{p.n_visual_tokens} " in figure.layout.title.text
    dimmed = np.asarray(viz.dim_dropped(view, p.grid, p.kept_visual_tokens, p.empty_cells)).astype(int)
    assert (dimmed[int(0.5 * cell_h), int(12.5 * cell_w)] == 255).all()
    # the score view: a heatmap of every cell that holds a token, none over the empty ones
    heat = viz.patch_figure(view, p.grid, p.kept_visual_tokens, scores, show_scores=True, empty=p.empty_cells)
    z = np.asarray(next(trace for trace in heat.data if trace.type == "heatmap").z, dtype=float)
    assert z.shape == (rows, cols) and np.isnan(z[:, 12]).all() and not np.isnan(z[0, 0])


@pytest.mark.parametrize("preset, family", [("smolvlm-tiny", "smolvlm"), ("internvl3-tiny", "internvl")])
def test_a_saved_folder_loads_offline_and_answers_alike(models, image, tmp_path, preset, family):
    from par_demo.models import load_model

    loaded = models(preset)
    loaded.model.save_pretrained(tmp_path)
    loaded.processor.save_pretrained(tmp_path)
    again = load_model(str(tmp_path), device="cpu")
    assert again.family.name == family
    inputs, query = prepared(loaded, image.resize((200, 100)))
    inputs_again, query_again = prepared(again, image.resize((200, 100)))
    assert torch.equal(inputs["input_ids"], inputs_again["input_ids"])
    assert query_again.layout.grid == query.layout.grid
    assert Engine(again.model).generate(inputs_again, max_new_tokens=4).tokens == \
        Engine(loaded.model).generate(inputs, max_new_tokens=4).tokens


@pytest.mark.parametrize("preset, options, message", [
    ("smolvlm-tiny", {"max_tiles": 0}, "--max-tiles must be a whole number from 1 to 36"),
    ("internvl3-tiny", {"max_tiles": "many"}, "--max-tiles must be a whole number"),
    ("smolvlm-tiny", {"max_pixels": 50_000}, "they take --max-tiles, not pixel limits"),
    ("qwen2.5-vl-tiny", {"max_tiles": 4}, "not cut into tiles; they take --min-pixels / --max-pixels"),
    ("llava-tiny", {"max_tiles": 4}, r"only tiled ones \(smolvlm, internvl\) --max-tiles"),
])
def test_tiling_options_are_checked_before_any_query(preset, options, message):
    from par_demo.models import load_model

    with pytest.raises(UserError, match=message):
        load_model(f"random:{preset}", device="cpu", options=options)
