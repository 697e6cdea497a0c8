"""The Python API: PAR and its baselines on a model you loaded, in a few lines.

    import par_demo

    pruner = par_demo.load()  # the embedded model; or a hub id, a local folder, random:<preset>
    result = pruner.generate("assets/examples/shapes_where.png", "Where is the blue square?", budget=0.5)
    print(result.text, result.flops_ratio, result.kept_layers)

or, with a model and processor loaded by transformers (any supported family, dtype, device or bitsandbytes
quantization):

    pruner = par_demo.wrap(model, processor)

A `Pruner` is a thin front over `Predictor`, the same object the CLI and the app run: `generate` returns the
`Prediction` whose `to_dict()` is exactly what `predict --json` prints, and `compare` is the app's "Compare all
methods".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from tqdm.auto import tqdm

from par_demo.comparison import COMPARE_ALL_ROUNDS, FIELD_METHODS, AllMethods, compare_methods
from par_demo.errors import UserError
from par_demo.families import family_of
from par_demo.images import load_image
from par_demo.methods import METHODS, REGISTRY, method_class
from par_demo.methods.base import check_budget, check_count, check_unit
from par_demo.models import DEFAULT_MODEL, LoadedModel, clean_question, clip_question, for_inference, load_model
from par_demo.predict import Prediction, Predictor
from par_demo.router import CONFIG_FILE

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["MethodInfo", "Pruner", "load", "wrap"]

ImageLike = str | os.PathLike | Image.Image


@dataclass(frozen=True)
class MethodInfo:
    """One pruning method as `Pruner.methods()` lists it."""

    name: str  # what `method=` takes
    # "reference" (the full model), "field" (PAR and the methods it is compared with), "baseline" or "ablation"
    group: str
    available: bool
    reason: str | None  # why it is unavailable (PAR without a router for this model), else None


class Pruner:
    """A loaded vision-language model with PAR, its baselines and the pruning engine.

    Build one with `par_demo.load` (a model name, as the CLI takes it) or `par_demo.wrap` (a model you loaded).
    Every call answers greedily with the explicit prefill/decode loop of `par_demo.engine`: dropped visual tokens
    leave the sequence, skipped layers never run, so the saved FLOPs are saved time.
    """

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    @property
    def model(self) -> PreTrainedModel:
        """The transformers model being pruned."""
        return self.predictor.loaded.model

    @property
    def family(self) -> str:
        """The model family (llava, qwen2.5-vl, smolvlm, internvl)."""
        return self.predictor.loaded.family.name

    def methods(self) -> list[MethodInfo]:
        """Every method, whether it can run on this model, and if not, why (PAR needs a router trained for it)."""
        reasons = self.predictor.available_methods()
        return [MethodInfo(name, "reference" if name == "full" else REGISTRY[name].extra or "field",
                           reasons[name] is None, reasons[name]) for name in METHODS]

    def generate(self, image: ImageLike | Sequence[ImageLike], question: str | Sequence[str], method: str = "par",
                 budget: float | None = None, tokens: int | None = None, layers: int | None = None,
                 start_layer: int = 2, max_new_tokens: int = 16, rounds: int = 0,
                 budget_unit: str = "flops") -> Prediction | list[Prediction]:
        """Answer a question about an image with `method` at `budget`.

        Args:
            image: a path or a PIL image; or a list of them.
            question: the question; or a list (one per image, or several about one image).
            method: one of `par_demo.METHODS` (`"full"` is the unpruned model). PAR needs a router trained for
                the model (`Pruner.methods()` says which methods can run here).
            budget: the fraction of the full model's prefill FLOPs the method may spend, in (0, 1]; each method
                takes the largest setting that fits. Default: 0.5, and 1.0 for `"full"` (its only setting).
            tokens: visual tokens to keep, instead of the budget (PAR's fixed versions, FastV, ...); the budget is
                then not used.
            layers: decoder layers to run, instead of the budget (with `tokens`, or alone: every visual token kept).
            start_layer: the layer from which dropped visual tokens leave the sequence (attention methods; FastV
                reads layer K-1's attention, so it starts at 1 when given 0).
            max_new_tokens: the most tokens to generate.
            rounds: 0 times the one run that answers; N > 0 also runs the method and the full model in turns for N
                rounds and reports medians and the measured speed-up (`result.timing`), as `predict` does.
            budget_unit: "flops" (papers' unit) or "time": the budget is then a fraction of the full prefill's time
                on this machine as the measured cost model predicts it (`calibrate`: measured on first use, about
                13 s for the embedded model on 2 cores, then cached); `result.time_ratio` is the prediction for the
                setting chosen.

        Returns:
            A `Prediction` (`text`, `flops_ratio`, `kept_visual_tokens`, `kept_layers`, `views_encoded`,
            `prefill_s`, `timing`, ... and `to_dict()`, the `predict --json` object); a list of them when `image`
            or `question` is a list, answered in turn with a progress bar.

        Raises:
            UserError: bad input (unknown method, budget outside (0, 1], unreadable image, empty question), a
                method that is unavailable for this model, or a budget below what the method can reach.
        """
        name = method_class(method).name  # an unknown name fails here, before any model call
        value = check_budget((1.0 if name == "full" else 0.5) if budget is None else budget)
        options = dict(tokens=tokens, layers=layers, start_layer=start_layer, max_new_tokens=max_new_tokens,
                       rounds=rounds, budget_unit=check_unit(budget_unit))
        if not (_is_many(image) or _is_many(question)):
            return self.predictor.predict(load_image(image), question, name, value, **options)
        pairs = _pairs(image, question)
        loaded = {id(i): load_image(i) for i, _ in pairs}  # every image read (and refused) before the first run
        for _, text in pairs:  # and every question: a bad last one must not cost the answers before it
            clean_question(clip_question(text)[0], self.predictor.loaded.processor)
        return [self.predictor.predict(loaded[id(i)], q, name, value, **options)
                for i, q in tqdm(pairs, desc=f"{name} @ {value:g}", disable=len(pairs) < 2)]

    def compare(self, image: ImageLike, question: str, methods: Sequence[str] | None = None, budget: float = 0.5,
                start_layer: int = 2, max_new_tokens: int = 16, rounds: int = COMPARE_ALL_ROUNDS,
                budget_unit: str = "flops") -> AllMethods:
        """The full model and each method at one budget, all timed together in turns (the app's "Compare all").

        Args:
            methods: a method name or a list of them, in the order wanted (the full model always runs, as the
                reference); default: PAR and the methods of the field (`Pruner.methods()`, group "field").
            rounds: timed rounds, the answering pass included.
            budget_unit: "flops" or "time", as in `generate`.

        Returns:
            `AllMethods`: `full` and `results` (method -> `Prediction`, each with its measured `timing`), `skipped`
            (method -> why it did not run: unavailable here, or the budget is out of its reach) and `to_dict()`.
        """
        asked = [methods] if isinstance(methods, str) else FIELD_METHODS if methods is None else methods
        names = list(dict.fromkeys(method_class(m).name for m in asked))  # in the order given, each once
        if "full" in names or not names:
            raise UserError("compare takes the pruning methods to set against the full model, which always runs "
                            f"as the reference{': leave full out' if names else ''} (e.g. {', '.join(FIELD_METHODS)})")
        value, unit = check_budget(budget), check_unit(budget_unit)
        check_count(start_layer, 0, self.predictor.engine.n_layers, "pruning start layer")  # not once per method
        if not isinstance(rounds, int) or not 1 <= rounds <= 100:
            raise UserError(f"rounds must be a whole number from 1 to 100, got {rounds!r}")
        pil_image = load_image(image)
        predictor = self.predictor

        def run(**setting: Any) -> Prediction:
            return predictor.predict(pil_image, question, max_new_tokens=max_new_tokens, **setting)

        def timed(predictions: list, settings: list) -> list:
            return predictor.measure(pil_image, question, predictions, settings, rounds, max_new_tokens,
                                     answers_are_a_round=True)

        *_, state = compare_methods(run, timed, question, value, names, predictor.available_methods(), start_layer,
                                    unit)
        return state


def load(name_or_path: str | os.PathLike = DEFAULT_MODEL, quant: str | None = None, device: str | None = None,
         dtype: str | None = None, router: str | os.PathLike | None = None, *, min_pixels: int | None = None,
         max_pixels: int | None = None, max_tiles: int | None = None) -> Pruner:
    """Load a model as the CLI does (`--model`, `--quant`, `--device`, `--dtype`, the image options) and wrap it.

    Args:
        name_or_path: a local `save_pretrained` folder (default: the embedded ShapesVQA model), a hub id (read from
            the local cache when offline), or `random:<preset>` (the exact architecture with random weights).
        quant: None, "4bit" or "8bit" (bitsandbytes; the vision path and LM head stay in full precision).
        device: "cpu", "cuda", "cuda:1", ...; default: cuda when there is one.
        dtype: "fp32", "bf16", "fp16" or "auto"; default: bf16 on a GPU, fp32 on a CPU.
        router: a PAR router folder; default: the model folder's `router/`, then `assets/routers/<model>/`.
        min_pixels: dynamic-resolution models (Qwen2.5-VL): the smallest image area the model is given.
        max_pixels: dynamic-resolution models: the largest (fewer pixels, fewer visual tokens, faster).
        max_tiles: tiled models (SmolVLM, InternVL3): at most this many tiles per image, besides the global view.
    """
    options = {k: v for k, v in dict(min_pixels=min_pixels, max_pixels=max_pixels, max_tiles=max_tiles).items()
               if v is not None}
    _check_router(router)  # before gigabytes of weights are loaded
    return _pruner(load_model(name_or_path, quant or "none", device, dtype, options=options), router)


def wrap(model: PreTrainedModel, processor: Any, router: str | os.PathLike | None = None) -> Pruner:
    """A `Pruner` around a stock transformers model and processor you loaded yourself.

    The model keeps its dtype, device and quantization, and is put in eval mode. In fp32 on a CPU its `nn.Linear`
    layers are swapped for `cpu_kernels.PackedLinear`, which holds the same Parameters (the state dict does not
    change) plus a copy packed for oneDNN that follows them (re-packed after an in-place update, unused after a cast
    or a move); code that looks for `nn.Linear` modules (adapters) should run before `wrap`, or set
    `PAR_DEMO_CPU_KERNELS=stock`.

    Args:
        model: e.g. `LlavaForConditionalGeneration.from_pretrained(...)`; any family of
            `par_demo.families.supported_model_types()`.
        processor: its processor (`AutoProcessor.from_pretrained(...)`). For Qwen2.5-VL, SmolVLM and InternVL3,
            whose stock processors need torchvision for their video half, any object holding the same
            `image_processor`, `tokenizer` and `chat_template` will do.
        router: a PAR router folder; default as in `load`.

    Raises:
        UserError: the model is not a supported vision-language model, or the processor is not one.
    """
    config = getattr(model, "config", None)
    if config is None or not isinstance(getattr(config, "model_type", None), str):
        raise UserError(f"wrap() takes a transformers vision-language model, got {type(model).__name__}")
    family = family_of(model)  # an unsupported family: one line naming the supported ones
    if not hasattr(model, "lm_head"):
        raise UserError(f"wrap() takes the whole model with its LM head ({family.model_class().__name__}), got "
                        f"{type(model).__name__}")
    family.check_supported(model)
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise UserError(f"wrap() takes the model's processor (AutoProcessor.from_pretrained), got "
                        f"{type(processor).__name__}")
    quant = quantization(model)
    name = getattr(model, "name_or_path", "") or getattr(config, "_name_or_path", "") or config.model_type
    adopted = family.adopt_processor(processor, config)
    _check_router(router)
    # only now, every input accepted, is the caller's model changed (eval mode, packed CPU layers)
    loaded = LoadedModel(for_inference(model, quant), adopted, str(name), quant, family)
    return _pruner(loaded, router)


def quantization(model: PreTrainedModel) -> str:
    """"4bit", "8bit" (bitsandbytes), another quantization method's name, or "none"."""
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return "none"
    read = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    if read("load_in_4bit"):
        return "4bit"
    if read("load_in_8bit"):
        return "8bit"
    return str(read("quant_method") or "quantized")


def _check_router(router: str | os.PathLike | None) -> None:
    if router is not None and not (Path(router) / CONFIG_FILE).is_file():
        raise UserError(f"'{router}' is not a router folder (no {CONFIG_FILE} in it)")


def _pruner(loaded: LoadedModel, router: str | os.PathLike | None) -> Pruner:
    predictor = Predictor(loaded)
    if router is not None:
        predictor.router_path = Path(router)
    return Pruner(predictor)


def _is_many(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _pairs(images: Any, questions: Any) -> list[tuple[Any, str]]:
    """(image, question) pairs: two lists pair up; a single image or question goes with every item of the other."""
    if (_is_many(images) and not images) or (_is_many(questions) and not questions):
        raise UserError("an empty list: give at least one image and one question")
    if _is_many(images) and _is_many(questions):
        if len(images) != len(questions):
            raise UserError(f"{len(images)} images and {len(questions)} questions: give as many of each, or one "
                            "image for many questions, or one question for many images")
        return list(zip(images, questions))
    if _is_many(images):
        return [(image, questions) for image in images]
    return [(images, question) for question in questions]
