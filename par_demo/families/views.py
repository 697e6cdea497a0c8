"""The views of a tiled image (tiles + the global view / thumbnail) as something a method can leave out before the
vision tower runs: which views a query has encoded, the overview a tiled query starts from, encoding more on demand,
and a query cut down to some of its visual tokens (`restrict`), whose budgets stay fractions of the whole image.
Generic: a family only says how to encode some of its views (`Family.prepare(..., overview_only=True)`)."""

from __future__ import annotations

from typing import Callable

import torch

from par_demo.families.base import Layout, Query
from par_demo.flops import Shape


def encoded_views(query: Query) -> list[int]:
    """The views (indices into `layout.tiles`) the tower has run on; [0] for an untiled image."""
    if query.layout.tile is None:
        return [0]
    if query.encoded is None:
        return list(range(len(query.layout.tiles)))
    return sorted(set(query.layout.tile[query.encoded].tolist()))


def overview_views(layout: Layout) -> list[int]:
    """The views that show the whole image (the global view / thumbnail): what a tiled query starts from."""
    return [i for i, tile in enumerate(layout.tiles) if tile.box == (0.0, 0.0, 1.0, 1.0)]


def restrict(query: Query, visual: torch.Tensor) -> Query:
    """The query with only the visual tokens `visual` (sorted indices) in its sequence, as if the rest had been
    dropped before the first layer: text tokens and every kept token keep their places and positions. Its vision
    FLOPs are those of the views that hold a kept token (what the tower must run), and `whole` remembers the full
    image, whose full prefill every budget is a fraction of."""
    keep = torch.ones(query.length, dtype=torch.bool, device=query.input_ids.device)
    keep[query.image_positions] = False
    keep[query.image_positions[visual]] = True
    index = keep.nonzero().squeeze(1)
    sub_layout = query.layout.subset(visual)
    whole = query.whole or Shape.of(query)
    views = len(query.layout.tiles) or 1
    run = views if sub_layout.tile is None else int(sub_layout.tile.unique().numel())
    return Query(
        input_ids=query.input_ids[:, index], inputs_embeds=query.inputs_embeds[:, index],
        image_positions=torch.searchsorted(index, query.image_positions[visual]),
        image_features=query.image_features[visual], positions=query.positions[..., index],
        next_position=query.next_position, layout=sub_layout,
        vision_flops=whole.vision_flops - (views - run) * query.view_flops, view_flops=query.view_flops,
        whole=whole)


def lazy_views(query: Query, encode: Callable[[list[int]], torch.Tensor], done: list[int],
               embed_dtype: torch.dtype) -> Query:
    """Make a tiled query whose tower ran on the views `done` only able to encode the others on demand: `encode(views)`
    -> their features (len(views) x tokens per view, D), in the views' order."""
    query.encoded = torch.isin(query.layout.tile, torch.tensor(done, device=query.layout.tile.device))

    @torch.inference_mode()  # the query's tensors are inference tensors: written in place only in that mode
    def encode_views(views: list[int]) -> None:
        todo = sorted(set(int(v) for v in views) - set(encoded_views(query)))
        if not todo:
            return
        features = encode(todo)
        slots = torch.isin(query.layout.tile, torch.tensor(todo, device=query.layout.tile.device)).nonzero()[:, 0]
        query.image_features[slots] = features.to(query.image_features.dtype)  # slots are in the views' order
        query.inputs_embeds[0, query.image_positions[slots]] = features.to(embed_dtype)
        query.encoded[slots] = True

    query.encode_views = encode_views
    return query
