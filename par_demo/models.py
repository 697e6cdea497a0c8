"""Loading vision-language models: local checkpoints, hub ids, random-weight presets, bitsandbytes quantization.

One function, `load_model`, turns a model spec into a `LoadedModel` (model + processor + the few facts the rest
of the project needs). Specs:
  - a local folder written by `save_pretrained` (the embedded model is the default);
  - a hub id such as `llava-hf/llava-1.5-7b-hf` (only from the local cache when offline);
  - `random:<preset>`: the exact architecture of a preset with random weights, for benchmarks and tests.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from par_demo import allocator, cpu_kernels
from par_demo.errors import UserError
from par_demo.families import Family, family_for_model_type, family_of, preset_families

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The embedded ShapesVQA models (docs/embedded-model.md). The default has LLaVA-1.5's 24 x 24 = 576 visual tokens,
# so that on a CPU dropping tokens buys time as it does on an LVLM; the 144-token one (12 x 12) answers 4x faster
# and is what tests use where the model's size does not matter.
DEFAULT_MODEL = str(PROJECT_ROOT / "assets" / "models" / "shapes-llava-576")
SMALL_MODEL = str(PROJECT_ROOT / "assets" / "models" / "shapes-llava")
QUANT_CHOICES = ("none", "4bit", "8bit")


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a stock transformers VLM (LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
    processor: object  # what its family's `encode` reads (tokenizer, image processor, chat template)
    name: str
    quant: str = "none"
    family: Family | None = None  # set by load_model from the config
    options: dict = field(default_factory=dict)  # image options (Qwen2.5-VL: min_pixels, max_pixels)

    def __post_init__(self):
        if self.family is None:
            self.family = family_of(self.model)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def config(self):
        return self.model.config

    def placement(self) -> str:
        """Where and how it runs, for a start-up log line: the device (the GPU's name, torch's CUDA build; a GPU
        Space whose driver does not fit that build runs on the CPU, and this line is where that shows), dtype and
        quantization."""
        device = self.device
        if device.type == "cuda":
            gpu = torch.cuda.get_device_name(device)
            where = f"{device} ({gpu}; torch {torch.__version__}, CUDA {torch.version.cuda})"
        else:
            where = f"{device} ({torch.get_num_threads()} threads; torch {torch.__version__})"
        quant = "" if self.quant == "none" else f", {self.quant} decoder"
        return f"{where}, {str(self.model.dtype).removeprefix('torch.')}{quant}"

    @property
    def n_layers(self) -> int:
        return self.config.text_config.num_hidden_layers

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def max_visual_tokens(self) -> int:
        return self.family.max_visual_tokens(self)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device) -> str:
    """A device this machine has (cpu, cuda, cuda:1, mps), or one UserError line."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}; use cpu, cuda, cuda:N, ...") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"device {device!r}: this machine has no CUDA GPU that torch can use; use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise UserError(f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r}: MPS is not available on this machine; use cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device {device!r}: a model runs on cpu, cuda or mps here")
    return str(device)


def default_dtype(device: str) -> torch.dtype:
    # bf16 on GPUs: in hardware from Ampere on, emulated (slower) on a T4, where it is still the default because
    # Qwen2-based decoders are reported to overflow in fp16 (`--dtype fp16` is the faster choice there for LLaVA);
    # fp32 on CPU, where bf16 matmuls are slow on most machines.
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    if name is None or str(name).lower() == "auto":
        return default_dtype(device)
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if isinstance(name, torch.dtype) and name in table.values():  # the library may be given torch.bfloat16 itself
        return name
    name = str(name).lower()  # "BF16" as "bf16", as method names are read
    if name not in table:
        raise UserError(f"unknown dtype '{name}'; choose one of: auto, fp32, bf16, fp16")
    return table[name]


# Presets up to this many parameters are drawn on the CPU, so that their weights are the same on every machine
# (the shipped routers' fingerprints rely on it); larger ones (the 2B-8B presets) on the device they will run on:
# drawing 3.75 B bf16 weights took 56 s on a 2-core CPU, against seconds on a GPU.
DRAW_ON_CPU_UP_TO = 10**9


def parameter_count(family, config) -> int:
    """Parameters of a model built from `config`, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in family.model_class()(config).parameters())


def build_random_model(preset_name: str, dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu"):
    """(model, processor, family) for a preset with random weights; deterministic for a given seed (and, above
    `DRAW_ON_CPU_UP_TO` parameters, for the kind of device they were drawn on)."""
    families = preset_families()
    if preset_name not in families:
        raise UserError(f"unknown preset '{preset_name}'; choose one of: {', '.join(families)}")
    family = families[preset_name]
    config, processor = family.build_random(preset_name)
    # counted only when it could matter: every load on a CPU (the tests' many tiny models) skips the meta build
    where = device if device != "cpu" and parameter_count(family, config) > DRAW_ON_CPU_UP_TO else "cpu"
    # the caller's random state is left as it was: only the draw is seeded
    forked = [torch.device(where)] if torch.device(where).type == "cuda" else []  # the CPU's is always forked
    with torch.random.fork_rng(devices=forked), _default_dtype(dtype), torch.device(where):
        torch.manual_seed(seed)
        model = family.model_class()(config)
    tokenizer = processor.tokenizer
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), processor, family


class _default_dtype:
    """Create parameters directly in the target dtype (a 7B model in fp32 would need 28 GB first)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.previous)


def quantization_config(quant: str, compute_dtype: torch.dtype, keep: list[str]):
    """bitsandbytes for the decoder; `keep` (the family's vision path and LM head) stays in full precision:
    small, and quality-critical (the paper's deployments do the same)."""
    from transformers import BitsAndBytesConfig

    if quant == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                                  llm_int8_skip_modules=keep)
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_spec(spec: str | os.PathLike) -> str:
    """Check a model spec's form before anything is loaded; returns it as text."""
    if isinstance(spec, os.PathLike):  # a pathlib.Path from the library
        spec = os.fspath(spec)
    if spec is not None and not isinstance(spec, str):
        raise UserError(f"the model must be a name, hub id or folder path, got {spec!r}")
    if spec is None or not spec.strip():
        raise UserError("no model given")
    spec = spec.strip()
    if spec.startswith("random:"):
        return spec
    if Path(spec).exists():
        if not (Path(spec) / "config.json").is_file():
            raise UserError(f"'{spec}' is not a model folder (no config.json in it)")
        return spec
    if _HUB_ID.match(spec) and ".." not in spec:
        return spec
    raise UserError(f"model '{spec}' is neither a local model folder, a hub id (owner/name) nor random:<preset>")


def load_model(spec: str = DEFAULT_MODEL, quant: str = "none", device: str | None = None,
               dtype: str | None = None, options: dict | None = None) -> LoadedModel:
    """Load a model for inference. Never runs remote code; offline hub misses and unsupported architectures
    become one clear UserError."""
    spec = resolve_spec(spec)
    if quant not in QUANT_CHOICES:
        raise UserError(f"unknown quantization '{quant}'; choose one of: {', '.join(QUANT_CHOICES)}")
    device = check_device(device or default_device())
    torch_dtype = parse_dtype(dtype, device)
    if quant != "none":
        _check_bitsandbytes(device)

    if spec.startswith("random:"):
        model, processor, family = build_random_model(spec.split(":", 1)[1], dtype=torch_dtype, device=device)
        family.check_supported(model)
        family.check_options(dict(options or {}))
        if quant == "none":
            return LoadedModel(for_inference(model.to(device), quant), processor, spec, quant, family, dict(options or {}))
        # bitsandbytes quantizes while loading, so a random model goes through a temporary checkpoint:
        # one code path for every quantized model.
        with tempfile.TemporaryDirectory(prefix="par-demo-") as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            del model
            loaded = _from_pretrained(tmp, quant, device, torch_dtype, options)
        loaded.name = spec
        return loaded
    return _from_pretrained(spec, quant, device, torch_dtype, options)


def _check_bitsandbytes(device: str) -> None:
    try:
        # Its CPU backend logs that an optional kernel package is missing; the built-in path works without it.
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        raise UserError(f"quantization needs a working bitsandbytes ({exc.__class__.__name__}: {exc})") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def _from_pretrained(spec: str, quant: str, device: str, dtype: torch.dtype, options: dict | None) -> LoadedModel:
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a loading bar per small checkpoint is noise in a CLI's output

    local = Path(spec).exists()
    offline = local or os.environ.get("HF_HUB_OFFLINE") == "1"
    where = "local folder" if local else "hub id (not in the local cache, and it cannot be downloaded here?)"
    try:
        config = AutoConfig.from_pretrained(spec, local_files_only=offline, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:  # unknown model_type is a ValueError / KeyError
        raise UserError(f"cannot load model '{spec}' from its {where}: {_first_line(exc)}") from None
    family = family_for_model_type(config.model_type)  # an unsupported architecture stops here, in one line
    family.check_options(dict(options or {}))
    with torch.device("meta"):  # an unsupported variant (a decoder with q/k norms, ...) too, before any weight is read
        family.check_supported(family.model_class()(config))
    kwargs = dict(dtype=dtype, local_files_only=offline, trust_remote_code=False)
    qconfig = quantization_config(quant, dtype, family.unquantized_modules())
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": device}
    try:
        processor = family.load_processor(spec, local_files_only=offline)
        model = family.model_class().from_pretrained(spec, **kwargs)
        if qconfig is None:
            model = model.to(device)  # where a model too large for the GPU runs out of memory
    except torch.OutOfMemoryError:
        raise UserError(f"model '{spec}' does not fit in {device}'s memory; try --quant 4bit or a smaller model") \
            from None
    except Exception as exc:  # a truncated safetensors file, weights of another shape, a missing file: one line
        raise UserError(f"cannot load model '{spec}' from its {where}: {_first_line(exc)}") from None
    # bitsandbytes' 8-bit matmul logs on every call that it casts fp32 inputs to fp16: expected, not news.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return LoadedModel(for_inference(model, quant), processor, spec, quant, family, dict(options or {}))


def for_inference(model, quant: str):
    """Eval mode, and for an unquantized model on a CPU the linear layers' weights prepacked for oneDNN
    (`cpu_kernels`: short, pruned sequences run as fast per FLOP as long ones); on a CPU, freed memory kept for the
    next prefill (`allocator`)."""
    model.eval()
    if next(model.parameters()).device.type == "cpu":
        allocator.keep_freed_memory()
    if quant == "none" and cpu_kernels.wanted(model):
        cpu_kernels.prepack(model)
    return model


def encode_query(loaded: LoadedModel, image: Image.Image, question: str) -> dict[str, torch.Tensor]:
    """Chat-formatted prompt + image -> the model's inputs (`input_ids` (1, L), pixels, ...) on its device."""
    return loaded.family.encode(loaded, image, clean_question(question, loaded.processor))


MAX_QUESTION_CHARS = 1000  # longer questions are clipped (with a notice): no real question needs more


def clip_question(question) -> tuple[str, list[str]]:
    """A question clipped to MAX_QUESTION_CHARS, and the notices to show the user about it."""
    if not isinstance(question, str):
        raise UserError("the question must be text")
    if len(question) <= MAX_QUESTION_CHARS:
        return question, []
    return question[:MAX_QUESTION_CHARS], [f"the question was clipped to its first {MAX_QUESTION_CHARS:,} characters "
                                           f"(it had {len(question):,})"]


def clean_question(question: str, processor) -> str:
    """A question as plain text: special tokens (an extra `<image>` would add image slots) are removed."""
    if not isinstance(question, str):
        raise UserError("the question must be text")
    tokenizer = processor.tokenizer
    for token in set(tokenizer.all_special_tokens) | {processor.image_token}:
        if token:
            question = question.replace(token, " ")
    # Control characters (NUL, escape sequences, ...) carry no meaning for the model; whitespace is normalised.
    question = "".join(ch if ch.isprintable() else " " for ch in question)
    question = " ".join(question.split())
    if not question:
        raise UserError("the question is empty")
    return question
