"""PAR: a learned meta-router chooses the visual tokens and the decoder layers per query.

For a budget b (fraction of the full prefill FLOPs, router included):
  1. the router scores every visual token and every layer, conditioned on b;
  2. the number of layers L comes from the router's Pareto table (measured at training time: for each budget,
     the (tokens, layers) split with the lowest KL to the full model), else from the default rule
     L = N * min(1, 0.5 + 0.6 b), which runs close to the paper's operating points (b 0.62 -> 28/32 layers as
     there; b 0.56 -> 27, the paper 28; b 0.47 -> 25, the paper 24). With a time budget the split is the most accurate one the measurement scored whose
     predicted time fits, and the router runs at the FLOPs budget that split was scored at (`time_row`);
  3. the L - |protected| best-scored routable layers run (protected first/last layers always run), and as many
     top-scored visual tokens are kept as the budget then allows. When every token fits, more layers are tried;
  4. the dropped tokens are absorbed by the kept token each is most like, whose attention logits get + log(its size)
     from layer K on (proportional attention, `methods/absorb.py`; its cosines are charged to the budget), when the
     router's config says `absorb` (its Pareto table is then measured that way too). Without it, counting questions
     fall apart on the embedded model (count_all at 0.25: 55.5 % dropped against 95.0 % absorbed).
  5. tiled images (SmolVLM, InternVL3): the router also chooses the tiles the vision tower runs on, before it runs.
     The tower encodes the global view first; the router scores its tokens, each tile gets the mean score of the
     global-view tokens over its part of the image, and the best tiles are encoded: as many as leave the budget room
     to keep at least a budget's share of the visual tokens encoded (so neither the tower nor the decoder takes it
     all). Steps 1-4 then run over the encoded tokens. Where the tower is most of the cost (SmolVLM-256M: 92 %),
     this is what makes small budgets reachable at all. Only with routers that drop tokens at K = 0.
`--tokens T --layers L` are the paper's fixed versions (the router still chooses which ones; every tile is encoded).
Visual tokens leave the sequence at the layer K the router was trained for (`start_layer` in its config; the
`--start-layer` option applies to the attention heuristics, whose scores come from layer K-1).

Ablations (`methods/par_ablations.py`; same budget search, same Pareto split): `par-tokens` routes tokens only (every layer runs),
`par-layers` routes layers only (every token kept), `par-drop` drops without absorbing, `par-prior` replaces the
router's scores by the attention prior it is trained from (FastV's attention row at layer K-1 for tokens, block
influence for layers; no router FLOPs) — what training bought.

A router is found, in order, at: `predictor.router_path` or $PAR_DEMO_ROUTER (explicit), `<model folder>/router/`
for local models, `assets/routers/<model name>/`. Without one the method reports itself unavailable, with the
command that trains one; the other methods keep working.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import replace
from pathlib import Path

import torch

from par_demo.engine import PruningPlan
from par_demo.errors import BudgetOutOfReach, UserError
from par_demo.families.views import encoded_views, overview_views, restrict
from par_demo.methods.absorb import absorb_flops
from par_demo.methods.base import Method, Setting, check_budget, check_count, top_indices
from par_demo.methods.cdpruner import dpp_flops, greedy_dpp
from par_demo.router import CONFIG_FILE, WEIGHTS_FILE, RouterConfig, load_router, sanitize

ROUTERS_DIR = Path(__file__).resolve().parent.parent.parent / "assets" / "routers"


def default_layers(budget: float, n_layers: int) -> int:
    return round(n_layers * min(1.0, 0.5 + 0.6 * budget))


def router_inputs(query) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's view of a query: projected visual tokens (n_v, D) and prompt text embeddings (n_t, D)
    (and `query.layout`, each visual token's place in the image)."""
    is_text = torch.ones(query.length, dtype=torch.bool, device=query.input_ids.device)
    is_text[query.image_positions] = False
    text = query.inputs_embeds[0, is_text]  # a copy already (boolean indexing)
    if torch.is_inference_mode_enabled():
        return query.image_features, text
    # clone(): the engine makes inference-mode tensors, which autograd may not save (training needs this).
    return query.image_features.clone(), text.clone()


def standardise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / (x.std() + 1e-6)


def select_tokens(config: RouterConfig, visual: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k visual tokens kept for token scores (n_v,), in sequence order: the k best-scored ("top"), or a greedy
    DPP over the tokens' cosine similarities with sigmoid(standardised score) as each token's quality ("dpp"), which
    keeps high-scored tokens that are unlike each other (one patch of each object rather than three of one)."""
    if config.token_selection == "dpp":
        quality = torch.sigmoid(standardise(scores.float()))
        return greedy_dpp(visual, quality.to(visual.device), k).sort().values
    return top_indices(scores, k)


def selection_flops(config: RouterConfig, n_visual: int, k: int, width: int) -> float:
    """What `select_tokens` adds to the prefill (top-k: nothing counted; DPP: its kernel rows and updates)."""
    return dpp_flops(n_visual, k, width) if config.token_selection == "dpp" and 0 < k < n_visual else 0.0


def router_folders(context) -> list[Path]:
    explicit = getattr(context, "router_path", None) or os.environ.get("PAR_DEMO_ROUTER")
    if explicit:
        return [Path(explicit)]
    folders = []
    if Path(context.loaded.name).is_dir():
        folders.append(Path(context.loaded.name) / "router")
    folders.append(ROUTERS_DIR / sanitize(context.loaded.name))
    return folders


def files_digest(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def undominated(rows: list[dict]) -> list[dict]:
    """The scored splits no other split beats on every count: as few or fewer layers and tokens, and agreeing with
    the full model as often or more (lower KL breaking ties). A split's time grows with its layers and its tokens on
    any machine (the cost model's terms are non-negative), so a dominated split is never the most accurate one that
    fits a time budget; dropping them keeps the search short (the shipped router's 176 splits leave a few dozen)."""
    def quality(row):
        return row.get("agreement", 0.0), -row.get("kl", 0.0)

    def beats(a, b):
        return (a is not b and a["layers"] <= b["layers"] and a["tokens"] <= b["tokens"] and quality(a) >= quality(b)
                and (a["layers"], a["tokens"], quality(a)) != (b["layers"], b["tokens"], quality(b)))

    kept = [row for row in rows if not any(beats(other, row) for other in rows)]
    unique = {(row["layers"], row["tokens"], quality(row)): row for row in kept}  # exact duplicates once
    return sorted(unique.values(), key=lambda row: (*quality(row), row["layers"]), reverse=True)  # best first


class Par(Method):
    name = "par"
    uses_tokens = True
    uses_layers = True
    route_tokens = True  # False: every visual token is kept
    route_layers = True  # False: every layer runs

    def __init__(self, context):
        super().__init__(context)
        self.router = None
        self.pareto: list[dict] = []
        self.scored: list[dict] = []  # every (budget, layers) split the Pareto measurement scored (`time_row`)
        self.folder: Path | None = None
        self.timing_identity = ""  # a digest of the router's files: its planning time was measured with them
        self._problem: str | None = None
        self._loaded_from = None  # the folder list the router was looked up with (an explicit path may change)
        self._asked = None  # (explicit router path, $PAR_DEMO_ROUTER, model name) the folders were found for
        self._routed: tuple | None = None  # (query, budget, token logits (n_v,), layer logits (N,))
        self._budget = 1.0
        self._viewed: tuple | None = None  # (tiled query, its encoded tokens as a query, overview routing FLOPs)
        self._order: tuple | None = None  # (layer logits, routable layers lowest-scored first): `skip_order`
        self._splits: tuple | None = None  # (scored rows, their (row, tokens, skip)): `scored_splits`
        self._time_rows: dict[tuple, dict] = {}  # `time_row`'s answers for the query shapes and limits asked

    # ---------------------------------------------------------------------------------------- router
    def _load(self) -> None:
        # what the folders follow from, compared first: looking them up touches the disk, and every plan asks
        context = self.context
        asked = (getattr(context, "router_path", None), os.environ.get("PAR_DEMO_ROUTER"), context.loaded.name)
        if asked == self._asked:
            return
        self._asked = asked
        folders = router_folders(context)
        if folders == self._loaded_from:
            return
        self._loaded_from, self.router, self._problem, self.timing_identity = folders, None, None, ""
        found = next((f for f in folders if (f / CONFIG_FILE).is_file()), None)
        if found is None:
            self._problem = (f"no router for this model; train one with: python -m par_demo train-router "
                             f"--model {self.context.loaded.name} --images PHOTO_FOLDER "
                             f"--out {ROUTERS_DIR / sanitize(self.context.loaded.name)}")
            return
        try:
            self.router, meta = load_router(found, self.context.loaded, device=self.context.loaded.device)
        except UserError as exc:
            self._problem = str(exc)
            return
        self.folder, self.pareto = found, sorted(meta.get("pareto", []), key=lambda row: row["budget"])
        self.timing_identity = files_digest(found / CONFIG_FILE, found / WEIGHTS_FILE)
        # routers measured before every split was kept have their best split per budget only
        self.scored = undominated(meta.get("training", {}).get("pareto_all") or self.pareto)

    def available(self):
        self._load()
        return self._problem

    @property
    def config(self):
        return self.router.config

    @property
    def absorbs(self) -> bool:
        """Dropped tokens are absorbed (proportional attention) when the router was measured that way."""
        return self.route_tokens and self.router is not None and self.config.absorb

    def route(self, query, budget: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits for one query at one budget: tokens (n_v,), layers (N,). Cached for the last query."""
        if self._routed is not None and self._routed[0] is query and self._routed[1] == budget:
            return self._routed[2], self._routed[3]
        with torch.inference_mode():
            visual, text = router_inputs(query)
            budgets = torch.tensor([float(budget)], device=visual.device)
            tokens, layers = self.router(visual, text, budgets, query.layout)
        self._routed = (query, budget, tokens[0].float(), layers[0].float())
        return self._routed[2], self._routed[3]

    @property
    def routes_views(self) -> bool:
        """Tiled images: the router chooses the views the tower runs on (tokens leave before the first layer)."""
        return self.route_tokens and self.available() is None and self.start_layer() == 0

    def extra_flops(self, query, setting):
        overview = self._viewed[2] if self._viewed is not None and self._viewed[1] is query else 0.0
        return overview + self.router.flops(query.layout, query.n_text) + selection_flops(
            self.config, query.n_visual, setting.tokens, query.image_features.shape[1])

    def setting_flops(self, query, setting):
        if self._viewed is not None and self._viewed[0] is query:  # a tiled query planned over its encoded views
            return super().setting_flops(self._viewed[1], setting)
        return super().setting_flops(query, setting)

    def setting_cost(self, query, setting, unit="flops"):
        if self._viewed is not None and self._viewed[0] is query:
            return super().setting_cost(self._viewed[1], setting, unit)
        return super().setting_cost(query, setting, unit)

    # ---------------------------------------------------------------------------------------- views
    def tile_scores(self, overview, budget: float) -> tuple[list[int], torch.Tensor]:
        """(tiles, score of each): the mean router score of the overview's tokens whose centres fall in the tile
        (the nearest one where none does)."""
        layout = overview.layout
        tiles = [i for i in range(len(layout.tiles)) if i not in overview_views(layout)]
        probs = torch.sigmoid(self.route(overview, budget)[0])
        y, x = layout.centres()
        scores = []
        for i in tiles:
            top, left, bottom, right = layout.tiles[i].box
            inside = (y >= top) & (y < bottom) & (x >= left) & (x < right)
            if not bool(inside.any()):
                inside = ((y - (top + bottom) / 2) ** 2 + (x - (left + right) / 2) ** 2).argmin()
            scores.append(probs[inside].float().mean())
        return tiles, torch.stack(scores) if scores else torch.zeros(0)

    def choose_views(self, query, budget: float, unit: str = "flops") -> list[int]:
        """The overview plus the best-scored tiles: as many as still let the decoder keep `budget` of the visual
        tokens encoded at the layer count the budget gets (the router's own FLOPs aside: at budget 1 every tile is
        encoded). The share it can keep falls as tiles are added, so their number is bisected. In time budgets the
        same rule with predicted seconds (`par_demo.cost`: the tower's time is charged per encoded visual token)."""
        encoded = query.encoded.nonzero().squeeze(1)
        overview = restrict(query, encoded)
        tiles, scores = self.tile_scores(overview, budget)
        order = [tiles[i] for i in torch.argsort(scores, descending=True, stable=True).tolist()]
        _, layer_logits = self.route(overview, budget)
        layers = self.target_layers(budget) if self.route_layers else self.n_layers
        skip = self.skip_for(layer_logits, layers, 0)
        limit = budget * self.full_cost(query, unit) * (1 + 1e-9)
        views_of, width = query.layout.tile, query.image_features.shape[1]

        def enough(m: int) -> bool:
            chosen = torch.tensor(encoded_views(query) + order[:m], device=views_of.device)
            sub = restrict(query, torch.isin(views_of, chosen).nonzero().squeeze(1))
            kept = math.ceil(budget * sub.n_visual)
            if unit == "time":  # the router's own work is in the method's measured overhead
                return self.setting_cost(sub, Setting(min(kept, sub.n_visual), skip, 0), "time") <= limit
            if kept >= sub.n_visual:
                return self.flops.prefill(sub, None, skip, 0) <= limit
            absorb = absorb_flops(sub.n_visual, kept, width) if self.absorbs else 0.0
            return self.flops.prefill(sub, kept, skip, 0, router=absorb) <= limit

        low, high = 0, len(order)  # the overview alone is the least there is
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if enough(mid) else (low, mid - 1)
        return encoded_views(query) + order[:low]

    def plan_views(self, query, budget: float, tokens, layers, start_layer, unit="flops"):
        """Plan a tiled query whose tower has run on the overview only: choose the views, encode them, plan over
        their tokens, and give the plan in the whole query's token indices."""
        self._budget, self._viewed = float(budget), None
        fixed = tokens is not None or layers is not None
        overview = query.layout.subset(query.encoded.nonzero().squeeze(1))  # what the router scored the tiles from
        views = list(range(len(query.layout.tiles))) if fixed else self.choose_views(query, budget, unit)
        query.encode_views(views)
        overview_flops = 0.0 if fixed else self.router.flops(overview, query.n_text)
        if not query.partial:  # every view encoded: plan the whole query, the overview's router pass charged
            self._viewed = (query, query, overview_flops)
            return self.plan(query, budget, tokens, layers, start_layer, unit)
        encoded = query.encoded.nonzero().squeeze(1)
        sub = restrict(query, encoded)
        self._viewed = (query, sub, overview_flops)
        plan, setting = self.plan(sub, budget, tokens, layers, start_layer, unit)
        keep = encoded if plan.keep_visual is None else encoded[plan.keep_visual]
        scores = torch.zeros(query.n_visual, device=plan.token_scores.device)
        scores[encoded] = plan.token_scores
        return replace(plan, keep_visual=keep, token_scores=scores), setting

    # ---------------------------------------------------------------------------------------- layers
    def skip_for(self, layer_logits: torch.Tensor, kept_layers: int, start_layer: int = 0) -> frozenset[int]:
        """Skip the lowest-scored routable layers so that `kept_layers` layers run in all (`start_layer` matters
        to `par-prior`, which must keep layer K-1)."""
        n_skip = self.n_layers - kept_layers
        return frozenset(self.skip_order(layer_logits)[:n_skip])

    def skip_order(self, layer_logits: torch.Tensor) -> list[int]:
        """The routable layers, lowest-scored first: the order they are skipped in. Kept for the last logits asked
        about: the budget search asks for it once per layer count tried, and reading a logit at a time from a
        tensor is most of the search's cost on a small model."""
        if self._order is None or self._order[0] is not layer_logits:
            logits = layer_logits.tolist()
            self._order = (layer_logits, sorted(self.config.routable(), key=logits.__getitem__))
        return self._order[1]

    def min_layers(self) -> int:
        return self.n_layers - len(self.config.routable())

    def target_layers(self, budget: float) -> int:
        """Layers kept at a budget: the Pareto table's choice at the nearest measured budget below (below its lowest
        budget, the lowest's), else, without a table, the rule."""
        below = [row for row in self.pareto if row["budget"] <= budget + 1e-9]
        if below:
            layers = below[-1]["layers"]
        elif self.pareto:
            layers = self.pareto[0]["layers"]
        else:
            layers = default_layers(budget, self.n_layers)
        return max(self.min_layers(), min(self.n_layers, int(layers)))

    def time_row(self, query, limit: float, start_layer: int) -> dict:
        """Time budgets: the most accurate split the Pareto measurement scored (highest agreement with the full
        model, then lowest KL) whose predicted time fits `limit` seconds; when none does, the cheapest one (the
        search then goes lower still). The measurement went by FLOPs budget and kept the best split of each, but it
        scored every layer count at each budget, and each of those is a (tokens, layers) split scored for quality
        whatever its cost on this machine: where time is not FLOPs, the best split for a time budget is often not
        one a FLOPs budget would pick.

        Chosen before the router runs, so that it runs once, at the row's budget: which layers are skipped comes
        later from its logits, and here only changes the time when layers before K are skipped (estimated with the
        last routable layers skipped first).

        The answer depends on the query's shape and the limit only, and walking the rows costs 0.2 ms on the embedded
        model, inside the timed prefill: it is kept per shape and limit (and per cost model and overhead, which the
        cheapest split's predicted time stands for)."""
        n_visual = query.n_visual
        key = (n_visual, query.n_text, limit, start_layer, id(self.scored),
               self.setting_cost(query, Setting(0, frozenset(), start_layer), "time"))
        if key not in self._time_rows:
            if len(self._time_rows) >= 256:
                self._time_rows.clear()
            self._time_rows[key] = self._most_accurate_fitting(query, limit, start_layer)
        return self._time_rows[key]

    def _most_accurate_fitting(self, query, limit: float, start_layer: int) -> dict:
        n_visual = query.n_visual
        for row, tokens, skip in self.scored_splits():  # most accurate first: the first that fits is the one
            if self.setting_cost(query, Setting(min(tokens, n_visual), skip, start_layer), "time") <= limit:
                return row
        return min(self.scored, key=lambda row: (row["layers"], row["tokens"]))

    def scored_splits(self) -> list[tuple[dict, int, frozenset[int]]]:
        """Each scored row with its token count and the layers it skips for its time (the last routable layers
        first), made once per router: the time search walks them on every query."""
        if self._splits is None or self._splits[0] is not self.scored:
            routable_last_first, lowest = self.config.routable()[::-1], self.min_layers()
            splits = []
            for row in self.scored:
                layers = max(lowest, min(self.n_layers, int(row["layers"])))
                splits.append((row, int(row["tokens"]), frozenset(routable_last_first[:self.n_layers - layers])))
            self._splits = (self.scored, splits)
        return self._splits[1]

    # ---------------------------------------------------------------------------------------- method
    def choose(self, query, budget, start_layer, unit="flops"):
        """The target layer count with as many tokens as fit (more layers if every token fits, fewer if no token
        does). Tokens are found by bisection: the cost grows with tokens, and a 576-token scan per layer count adds
        up. A budget out of reach at K is searched again at K-1, ... as in `Method.choose`."""
        full = self.full_cost(query, unit)
        limit = check_budget(budget) * full * (1 + 1e-9)
        target = self.target_layers(self._budget) if self.route_layers else self.n_layers
        if unit == "time" and self.route_layers and self.scored:
            row = self.time_row(query, limit, start_layer)
            target = max(self.min_layers(), min(self.n_layers, int(row["layers"])))
            # The router runs at the FLOPs budget of the split it was scored at, not at the time budget: a split
            # routed at another budget is not the split the measurement scored (on the 576-token model, PAR at
            # time 0.5 answered 93.2 % of the 1,200 held-out samples routed at 0.5, 97.5 % routed at the row's 0.35)
            self._budget = float(row["budget"])
        _, layer_logits = self.route(query, self._budget)
        n_v = query.n_visual
        floor_layers = self.min_layers() if self.route_layers else self.n_layers  # par-tokens runs every layer
        for k in range(start_layer, self.min_start_layer - 1, -1):
            def fits(tokens, skip):
                return self.setting_cost(query, Setting(tokens, skip, k), unit) <= limit

            more = None  # the most layers above the target that fit with every token; a layer more never costs less
            for layers in range(target + 1, self.n_layers + 1):  # so the first that does not fit ends the search
                skip = self.skip_for(layer_logits, layers, k)
                if not fits(n_v, skip):
                    break
                more = Setting(n_v, skip, k)
            if more is not None:
                return more
            for layers in range(target, floor_layers - 1, -1):
                skip = self.skip_for(layer_logits, layers, k)
                if not self.route_tokens:
                    if fits(n_v, skip):
                        return Setting(n_v, skip, k)
                    continue
                if fits(n_v, skip):  # every token: nothing absorbed or charged for it (cost dips at n_v)
                    return Setting(n_v, skip, k)
                if not fits(0, skip):
                    continue
                low, high = 0, n_v  # fits(low) holds
                while low < high:
                    mid = (low + high + 1) // 2
                    low, high = (mid, high) if fits(mid, skip) else (low, mid - 1)
                return Setting(low, skip, k)
        cheapest = self.setting_cost(query, Setting(0 if self.route_tokens else n_v,
                                                    self.skip_for(layer_logits, floor_layers, self.min_start_layer),
                                                    self.min_start_layer), unit)
        raise BudgetOutOfReach(self.name, budget, cheapest / full, unit)

    def fixed(self, query, tokens, layers, start_layer):
        n_tokens = query.n_visual if tokens is None else check_count(tokens, 0, query.n_visual, "tokens kept")
        n_layers = self.n_layers if layers is None else check_count(layers, 1, self.n_layers, "layers kept")
        if n_layers < self.min_layers():
            raise UserError(f"{self.name} keeps at least {self.min_layers()} layers (protected: "
                            f"{self.config.protected()}); got {n_layers} layers")
        _, layer_logits = self.route(query, self._budget)
        return Setting(n_tokens, self.skip_for(layer_logits, n_layers, start_layer), start_layer)

    def fixed_budget(self, query, tokens, layers, start_layer) -> float:
        """The FLOPs fraction of a fixed version (which routable layers are skipped does not change it much)."""
        n_tokens = query.n_visual if tokens is None else tokens
        n_skip = self.n_layers - (self.n_layers if layers is None else layers)
        skip = self.config.routable()[::-1][:max(n_skip, 0)]
        kept = None if n_tokens >= query.n_visual else n_tokens
        cost = self.flops.prefill(query, kept, skip, start_layer)
        return min(1.0, cost / self.flops.full(query))

    def start_layer(self) -> int:
        """K: where dropped tokens leave the sequence; the one the router's flows were trained and measured at."""
        return self.config.start_layer

    def plan(self, query, budget=1.0, tokens=None, layers=None, start_layer=2, unit="flops"):
        reason = self.available()
        if reason:
            raise UserError(reason)
        start_layer = self.start_layer()
        if query.partial:  # the views the tower encodes, then the split of their tokens and layers, by `unit`
            return self.plan_views(query, check_budget(budget), tokens, layers, start_layer, unit)
        if self._viewed is not None and self._viewed[1] is not query:
            self._viewed = None
        self._budget = float(budget)
        if tokens is not None or layers is not None:
            try:
                self._budget = self.fixed_budget(query, int(tokens) if tokens is not None else None,
                                                 int(layers) if layers is not None else None, start_layer)
            except (TypeError, ValueError):
                pass  # bad counts get their message from `fixed`
        return super().plan(query, budget, tokens, layers, start_layer, unit)

    def make_plan(self, query, setting):
        token_logits, layer_logits = self.route(query, self._budget)
        layer_scores = torch.sigmoid(layer_logits)
        layer_scores[self.config.protected()] = 1.0  # protected layers always run
        keep = None
        if setting.tokens < query.n_visual:
            keep = select_tokens(self.config, query.image_features, token_logits, setting.tokens)
            keep = keep.to(query.image_positions.device)
        return PruningPlan(start_layer=setting.start_layer, keep_visual=keep, skip_layers=setting.skip,
                           token_scores=torch.sigmoid(token_logits), layer_scores=layer_scores)
