"""Stock transformers `model.generate`, timed the way the engine times itself: what users would otherwise run.

`bench --methods full,stock,...` puts it beside the engine's own unpruned model, so that "the engine's full model
is no slower than stock generate" is a measured ratio in the same run. Greedy, every requested token generated
(EOS decoded past, like the bench's engine rows), inputs encoded beforehand (outside the clock, as for the engine).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from par_demo.engine import synchronize


@dataclass
class StockRun:
    tokens: list[int]
    prefill_s: float  # from the call to the first new token (vision, prefill, first argmax; as `Generation`)
    total_s: float
    kv_cache_bytes: int


class FirstTokenClock:
    """A `generate` streamer that notes when the first new token arrives. `generate` hands its streamer the prompt
    first and then each step's tokens, already copied to the CPU, so the time is taken after the device finished."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, tokens) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def cache_bytes(cache) -> int:
    """Bytes of the keys and values a stock cache holds (transformers 5's `DynamicCache`: `.layers[i].keys`; the
    generate output names it `cache`, earlier 5.x releases `past_key_values`)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


@torch.inference_mode()
def stock_generate(loaded, inputs: dict, new_tokens: int) -> StockRun:
    """Greedy `loaded.model.generate` of exactly `new_tokens` tokens on `encode`'s inputs."""
    stock = loaded.family.stock_inputs(inputs)
    clock = FirstTokenClock()
    synchronize(loaded.device)
    start = time.perf_counter()
    # eos_token_id=None: EOS is a token like any other, taken when it is the argmax and decoded past, as the
    # engine's bench rows do (min_new_tokens would instead forbid it, and change the answer)
    out = loaded.model.generate(**stock, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                streamer=clock, return_dict_in_generate=True,
                                pad_token_id=loaded.processor.tokenizer.eos_token_id)
    synchronize(loaded.device)
    total = time.perf_counter() - start
    tokens = out.sequences[0, stock["input_ids"].shape[1]:].tolist()
    return StockRun(tokens, (clock.first or start + total) - start, total, cache_bytes(getattr(out, "cache", None) or out.past_key_values))
