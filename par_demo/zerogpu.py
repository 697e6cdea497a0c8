"""Hugging Face ZeroGPU: a GPU is attached only while a function marked `spaces.GPU` runs, in a worker process
forked from the app's. The two model calls the app makes on the GPU live here, marked when the Space is ZeroGPU and
plain functions everywhere else.
"""

from __future__ import annotations

import importlib.util
import os
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from par_demo.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

    from par_demo.predict import Prediction, Predictor


def zerogpu_enabled() -> bool:
    return bool(os.environ.get("SPACES_ZERO_GPU")) and importlib.util.find_spec("spaces") is not None


def on_gpu(fn: Callable | None = None, *, duration: int = 60) -> Callable:
    """`spaces.GPU` on a Hugging Face ZeroGPU Space; a no-op everywhere else (no `spaces` package or env)."""

    def decorate(func: Callable) -> Callable:
        if not zerogpu_enabled():
            return func
        import spaces  # only present on Spaces

        return spaces.GPU(duration=duration)(func)

    return decorate(fn) if fn is not None else decorate


# On ZeroGPU these run in a GPU worker forked from this process, and their arguments reach it pickled: the model
# must not be one of them (it would be copied through shared memory on every call, away from the weights ZeroGPU
# placed). They take the key of a predictor in this registry, which the worker inherits from the fork, and return
# only CPU data (answer text, numbers, lists).
_PREDICTORS: weakref.WeakValueDictionary[int, Predictor] = weakref.WeakValueDictionary()


def register(predictor: Predictor) -> int:
    _PREDICTORS[id(predictor)] = predictor
    return id(predictor)


# A ZeroGPU worker hands an exception back to the app only as a generic "ZeroGPU worker error" unless it is a
# gr.Error, so a refusal (a budget out of reach, which the sweep and "Compare all" note and go on from) travels back
# as a value, and `answer_or_raise` raises it again on the app's side.
@on_gpu
def predict_on_device(key: int, image: Image.Image, question: str, kwargs: dict) -> Prediction | UserError:
    try:
        return _PREDICTORS[key].predict(image, question, **kwargs)
    except UserError as exc:
        return exc


@on_gpu
def measure_on_device(key: int, image: Image.Image, question: str, predictions: list, settings: list,
                      rounds: int, max_new_tokens: int, answers_are_a_round: bool = False) -> list | UserError:
    try:
        return _PREDICTORS[key].measure(image, question, predictions, settings, rounds, max_new_tokens,
                                        answers_are_a_round=answers_are_a_round)
    except UserError as exc:
        return exc


def answer_or_raise(result):
    """What a GPU-side call returned, or the refusal it returned, raised."""
    if isinstance(result, UserError):
        raise result
    return result
