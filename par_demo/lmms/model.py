"""`lmms-eval --model par_demo`: this project's pruning methods answering lmms-eval's generation tasks.

    lmms-eval --model par_demo --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=par,budget=0.5 \
        --tasks pope --batch_size 1 --output_path runs/lmms

Model arguments: `pretrained` (anything `load_model` loads; default: the embedded model), `method`, `budget`,
`tokens`, `layers`, `quant`, `max_new_tokens` (default: the task's), `device`, `dtype`.

A "simple" lmms-eval model: each request brings the task's prompt text and a function that returns the
document's images. One image and its question go through `Predictor.predict`, one request at a time, greedy.
For every answer the prefill FLOPs ratio, the visual tokens kept and the decoder layers run are recorded (and
logged at DEBUG); once all requests are answered, their means over every process are logged per task and added
to the run's results file under `throughput` (`avg_flops_ratio`, ...), next to the task's accuracy.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from accelerate import Accelerator
from loguru import logger as eval_logger
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from PIL import Image
from tqdm import tqdm

from par_demo.errors import UserError
from par_demo.images import load_image
from par_demo.methods import method_class
from par_demo.methods.base import check_budget
from par_demo.models import DEFAULT_MODEL, default_device, load_model
from par_demo.predict import Predictor

DEFAULT_MAX_NEW_TOKENS = 16  # when neither the model arguments nor the task set one
ARGUMENTS = ("pretrained", "method", "budget", "tokens", "layers", "quant", "max_new_tokens", "device", "dtype")


@dataclass
class AnswerStats:
    """What one answer cost: the facts a run reports next to its accuracy."""

    task: str
    doc_id: int
    flops_ratio: float  # prefill FLOPs / the full model's
    visual_tokens: int  # kept
    n_visual_tokens: int
    layers: int  # decoder layers run
    n_layers: int
    new_tokens: int
    seconds: float


class ParDemo(lmms):
    is_simple = True

    def __init__(self, pretrained: str = DEFAULT_MODEL, method: str = "full", budget: float = 1.0,
                 tokens: int | None = None, layers: int | None = None, quant: str = "none",
                 max_new_tokens: int | None = None, device: str | None = None, dtype: str | None = None,
                 batch_size=1, **unknown):
        super().__init__()
        if unknown:
            raise UserError(f"par_demo does not take the model argument(s) {', '.join(sorted(unknown))}; "
                            f"it takes: {', '.join(ARGUMENTS)}")
        if str(batch_size) != "1":
            raise UserError(f"par_demo answers one request at a time (batch size 1), got --batch_size {batch_size}: "
                            "its pruning plan is chosen per image and question")
        self.method = method_class(method).name
        self.budget = check_budget(budget)
        self.tokens = _optional_count(tokens, "tokens")
        self.layers = _optional_count(layers, "layers")
        self.max_new_tokens = _optional_count(max_new_tokens, "max_new_tokens")

        device = str(device or default_device())
        # lmms-eval shares this Accelerator: on CPU it must know, or several processes would not form a group.
        self.accelerator = Accelerator(cpu=device.startswith("cpu"))
        if self.accelerator.num_processes > 1 and device.startswith("cuda"):
            # data parallel: one GPU per process (a `cuda:N` given to every process would put them all on N)
            device = f"cuda:{self.accelerator.local_process_index}"
        self._device = torch.device(device)
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes

        self.predictor = Predictor(load_model(str(pretrained), quant, device, dtype))
        reason = self.predictor.method(self.method).available()
        if reason:
            raise UserError(f"{self.method} is unavailable: {reason}")
        self.records: list[AnswerStats] = []
        self._warned_sampling: set[str] = set()

    @property
    def device(self) -> torch.device:
        return self._device

    # ------------------------------------------------------------------------------------------- requests
    def generate_until(self, requests) -> list[str]:
        answers = []
        for request in tqdm(requests, desc="par_demo", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            image = _one_image(doc_to_visual(self.task_dict[task][split][doc_id]), task, doc_id)
            self._warn_if_sampling(task, gen_kwargs)
            p = self.predictor.predict(image, context, self.method, self.budget, self.tokens, self.layers,
                                       max_new_tokens=self._max_new_tokens(gen_kwargs))
            answers.append(cut_at_stop_strings(p.answer, gen_kwargs.get("until")))
            if request.metadata.get("__padding_only__"):
                continue  # lmms-eval evens out the processes' shares with repeats; they are not scored
            stats = AnswerStats(task, int(doc_id), p.flops_ratio, len(p.kept_visual_tokens), p.n_visual_tokens,
                                len(p.kept_layers), p.n_layers, p.new_tokens, p.total_s)
            self.records.append(stats)
            eval_logger.debug(f"par_demo {task} doc {doc_id}: FLOPs {stats.flops_ratio:.3f}, visual tokens "
                              f"{stats.visual_tokens}/{stats.n_visual_tokens}, layers {stats.layers}/{stats.n_layers}, "
                              f"answer {answers[-1]!r}")
        return answers

    def loglikelihood(self, requests):
        raise unsupported("loglikelihood (multiple-choice scoring)")

    def generate_until_multi_round(self, requests):
        raise unsupported("multi-round generation")

    def _max_new_tokens(self, gen_kwargs: dict) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return min(int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), 1024)

    def _warn_if_sampling(self, task: str, gen_kwargs: dict) -> None:
        sampling = (gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0
                    or int(gen_kwargs.get("num_beams") or 1) > 1)
        if sampling and task not in self._warned_sampling:
            self._warned_sampling.add(task)
            eval_logger.warning(f"par_demo decodes greedily; task {task} asks for sampling or beam search "
                                f"({gen_kwargs}), which is ignored")

    # ------------------------------------------------------------------------------------------- report
    def clean(self):
        # lmms-eval calls clean() on every process once all requests are answered and before scoring: the one
        # point every process reaches exactly once, so gathering the records there cannot leave a process waiting.
        records = self._records_of_all_processes()
        if self.rank == 0 and records:
            self._report(records)
        self.records = []
        super().clean()

    def _records_of_all_processes(self) -> list[AnswerStats]:
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            parts = [None] * self.world_size
            dist.all_gather_object(parts, self.records)
            return [r for part in parts for r in part]
        return list(self.records)

    def _report(self, records: list[AnswerStats]) -> None:
        setting = f"method {self.method}" + (f", budget {self.budget:g}" if self.method != "full" else "")
        for task, means in summarize(records).items():
            eval_logger.info(
                f"par_demo ({setting}) on {task}: {means['answers']:.0f} answers from {self.world_size} "
                f"process{'es' if self.world_size > 1 else ''}, prefill FLOPs "
                f"{means['flops_ratio']:.3f} of the full model, visual tokens kept {means['visual_tokens']:.1f} of "
                f"{means['n_visual_tokens']:.0f}, decoder layers run {means['layers']:.2f} of {means['n_layers']:.0f}")
        seconds = sum(r.seconds for r in records)
        new_tokens = sum(r.new_tokens for r in records)
        log_metrics(total_elapsed_time=seconds, total_gen_tokens=new_tokens,
                    avg_speed=new_tokens / seconds if seconds > 0 else 0.0,
                    additional_metrics=report_metrics(records))


def summarize(records: list[AnswerStats]) -> dict[str, dict[str, float]]:
    """Per task (and "all" when there are several): the number of answers and the mean of every number."""
    groups: dict[str, list[AnswerStats]] = defaultdict(list)
    for r in records:
        groups[r.task].append(r)
    if len(groups) > 1:
        groups["all"] = list(records)
    keys = ("flops_ratio", "visual_tokens", "n_visual_tokens", "layers", "n_layers")
    return {task: {"answers": float(len(rs)), **{k: sum(asdict(r)[k] for r in rs) / len(rs) for k in keys}}
            for task, rs in groups.items()}


def report_metrics(records: list[AnswerStats]) -> dict[str, float]:
    """The means lmms-eval adds to the results file (as `avg_<name>`): over all answers, and per task."""
    summary = summarize(records)
    overall = summary.get("all") or next(iter(summary.values()))
    metrics = {"num_requests": float(len(records)), "flops_ratio": overall["flops_ratio"],
               "visual_tokens_kept": overall["visual_tokens"], "layers_run": overall["layers"]}
    for task, means in summary.items():
        if task != "all":
            metrics[f"flops_ratio[{task}]"] = means["flops_ratio"]
    return metrics


def cut_at_stop_strings(text: str, until) -> str:
    """The answer up to the first of the task's stop strings (`until`), as lmms-eval's models return it."""
    for stop in [until] if isinstance(until, str) else (until or []):
        if stop:
            text = text.split(stop)[0]
    return text


def unsupported(kind: str) -> UserError:
    return UserError(f"par_demo does not answer {kind} requests: it prunes the prefill of greedy generation, so it "
                     "runs generation tasks (output_type: generate_until) only")


def _one_image(visuals, task: str, doc_id) -> Image.Image:
    """The document's single image (a PIL image or an image file); anything else is one clear error."""
    flat = [v for item in (visuals or []) for v in (item if isinstance(item, (list, tuple)) else [item])]
    if len(flat) != 1 or not isinstance(flat[0], (Image.Image, str)):
        kinds = ", ".join(type(v).__name__ for v in flat) or "none"
        raise UserError(f"par_demo answers about exactly one image per question; task {task} document {doc_id} "
                        f"gives {len(flat)} visual input(s) ({kinds})")
    return load_image(flat[0])


def _optional_count(value, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value
