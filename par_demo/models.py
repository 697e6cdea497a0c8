"""Loading LLaVA models: local checkpoints, hub ids, random-weight presets, and bitsandbytes quantization.

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
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from par_demo.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = str(PROJECT_ROOT / "assets" / "models" / "shapes-llava")
QUANT_CHOICES = ("none", "4bit", "8bit")
# Kept in full precision when quantizing: small, and quality-critical (the paper's deployments do the same).
UNQUANTIZED_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


@dataclass(frozen=True)
class Preset:
    """Architecture of a random-weight LLaVA: CLIP vision tower -> 2-layer MLP projector -> Llama decoder."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    lm_width: int
    lm_layers: int
    lm_heads: int
    lm_kv_heads: int
    lm_mlp: int
    vocab_size: int
    vision_feature_layer: int = -2


PRESETS: dict[str, Preset] = {
    # LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 image tokens) + Vicuna-7B (32 layers x 4096).
    "llava-1.5-7b": Preset(336, 14, 1024, 24, 16, 4096, 4096, 32, 32, 32, 11008, 32064),
    # CPU-sized stand-in with the same 576 image tokens, for benchmarks on a laptop.
    "llava-mid": Preset(336, 14, 256, 4, 4, 1024, 768, 12, 12, 12, 2048, 8192),
    # Tiny, for tests: 12x12 = 144 image tokens, grouped-query attention, 8 layers.
    "llava-tiny": Preset(96, 8, 32, 2, 2, 64, 128, 8, 4, 2, 256, 512),
}


@dataclass
class LoadedModel:
    model: torch.nn.Module  # LlavaForConditionalGeneration
    processor: object  # LlavaProcessor
    name: str
    quant: str = "none"

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return self.config.text_config.num_hidden_layers

    @property
    def grid(self) -> tuple[int, int]:
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    # bf16 on GPUs that support it; fp32 on CPU, where bf16 matmuls are slow on most machines.
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    if name is None or name == "auto":
        return default_dtype(device)
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise UserError(f"unknown dtype '{name}'; choose one of: auto, fp32, bf16, fp16")
    return table[name]


def build_config(preset: Preset, image_token_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=preset.vision_width, intermediate_size=preset.vision_mlp,
        num_hidden_layers=preset.vision_layers, num_attention_heads=preset.vision_heads,
        image_size=preset.image_size, patch_size=preset.patch_size, projection_dim=preset.vision_width,
    )
    text = LlamaConfig(
        hidden_size=preset.lm_width, intermediate_size=preset.lm_mlp, num_hidden_layers=preset.lm_layers,
        num_attention_heads=preset.lm_heads, num_key_value_heads=preset.lm_kv_heads,
        vocab_size=preset.vocab_size, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        vision_feature_layer=preset.vision_feature_layer, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def build_random_model(preset_name: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(model, processor) for a preset with random weights; deterministic for a given seed."""
    from transformers import LlavaForConditionalGeneration

    from par_demo.tokenizer import build_processor

    if preset_name not in PRESETS:
        raise UserError(f"unknown preset '{preset_name}'; choose one of: {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    processor = build_processor(image_size=preset.image_size, patch_size=preset.patch_size)
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    config = build_config(preset, image_token_id)
    config.text_config.eos_token_id = processor.tokenizer.eos_token_id
    torch.manual_seed(seed)
    with _default_dtype(dtype):
        model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model.eval(), processor


class _default_dtype:
    """Create parameters directly in the target dtype (a 7B model in fp32 would need 28 GB first)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.previous)


def quantization_config(quant: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quant == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                                  llm_int8_skip_modules=UNQUANTIZED_MODULES)
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED_MODULES)
    return None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_spec(spec: str) -> str:
    """Check a model spec's form before anything is loaded; returns it unchanged."""
    if not isinstance(spec, str) or not spec.strip():
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
               dtype: str | None = None) -> LoadedModel:
    """Load a model for inference. Never runs remote code; offline hub misses become one clear UserError."""
    spec = resolve_spec(spec)
    if quant not in QUANT_CHOICES:
        raise UserError(f"unknown quantization '{quant}'; choose one of: {', '.join(QUANT_CHOICES)}")
    device = device or default_device()
    torch_dtype = parse_dtype(dtype, device)
    if quant != "none":
        _check_bitsandbytes(device)

    if spec.startswith("random:"):
        model, processor = build_random_model(spec.split(":", 1)[1], dtype=torch_dtype)
        if quant == "none":
            return LoadedModel(model.to(device), processor, spec, quant)
        # bitsandbytes quantizes while loading, so a random model goes through a temporary checkpoint:
        # one code path for every quantized model.
        with tempfile.TemporaryDirectory(prefix="par-demo-") as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            del model
            loaded = _from_pretrained(tmp, quant, device, torch_dtype)
        loaded.name = spec
        return loaded
    return _from_pretrained(spec, quant, device, torch_dtype)


def _check_bitsandbytes(device: str) -> None:
    try:
        # Its CPU backend logs that an optional kernel package is missing; the built-in path works without it.
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        raise UserError(f"quantization needs a working bitsandbytes ({exc.__class__.__name__}: {exc})") from None


def _from_pretrained(spec: str, quant: str, device: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a loading bar per small checkpoint is noise in a CLI's output

    local = Path(spec).exists()
    offline = local or os.environ.get("HF_HUB_OFFLINE") == "1"
    kwargs = dict(dtype=dtype, local_files_only=offline, trust_remote_code=False)
    qconfig = quantization_config(quant, dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": device}
    try:
        processor = AutoProcessor.from_pretrained(spec, local_files_only=offline, trust_remote_code=False)
        model = LlavaForConditionalGeneration.from_pretrained(spec, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        where = "local folder" if local else "hub id (not in the local cache, and it cannot be downloaded here?)"
        raise UserError(f"cannot load model '{spec}' from its {where}: {first_line}") from None
    if qconfig is None:
        model = model.to(device)
    # bitsandbytes' 8-bit matmul logs on every call that it casts fp32 inputs to fp16: expected, not news.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return LoadedModel(model.eval(), processor, spec, quant)


def encode_query(loaded: LoadedModel, image: Image.Image, question: str) -> dict[str, torch.Tensor]:
    """Chat-formatted prompt + image -> `input_ids` (1, L) and `pixel_values` (1, 3, H, W) on the model's device."""
    question = clean_question(question, loaded.processor)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = loaded.processor.apply_chat_template(conversation, add_generation_prompt=True)
    batch = loaded.processor(images=image.convert("RGB"), text=prompt, return_tensors="pt")
    context = loaded.config.text_config.max_position_embeddings
    if batch["input_ids"].shape[1] > context:
        raise UserError(f"the prompt is {batch['input_ids'].shape[1]} tokens long; this model reads at most {context}")
    vision_dtype = loaded.model.model.vision_tower.embeddings.patch_embedding.weight.dtype
    return {
        "input_ids": batch["input_ids"].to(loaded.device),
        "pixel_values": batch["pixel_values"].to(loaded.device, vision_dtype),
    }


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
