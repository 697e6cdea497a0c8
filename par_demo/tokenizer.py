"""An offline LLaVA processor for the embedded model: word-level tokenizer + CLIP image processor + chat template.

Nothing is downloaded. The vocabulary is every word the ShapesVQA questions and answers use plus the chat
template's words; anything else maps to <unk>. The prompt format is LLaVA-1.5's: "USER: <image>\\n{q} ASSISTANT:".
"""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from par_demo.shapes import COLORS, NUMBER_WORDS, QUADRANTS, SHAPES

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IMAGE]

# LLaVA-1.5 conversation format; the tokenizer adds <s> itself, so the template does not.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% else %} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Mean/std 0.5: pixel values land in [-1, 1]; the model is trained from scratch, so CLIP's statistics buy nothing.
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]


def vocabulary() -> list[str]:
    """Special tokens first (fixed ids 0-4), then every word of the task and the template (lower-case)."""
    words = ["user", "assistant", "system", ":", "?", ".", ",", "'", "a", "the", "is", "are", "there"]
    words += ["what", "color", "shape", "object", "objects", "how", "many", "where", "yes", "no"]
    words += list(SHAPES) + [s + "s" for s in SHAPES] + list(COLORS) + list(NUMBER_WORDS)
    words += sorted({w for q in QUADRANTS for w in q.split()})
    unique = list(dict.fromkeys(words))
    return SPECIAL_TOKENS + unique


def build_word_tokenizer(special_tokens: list[str], unk: str, pad: str, eos: str, bos: str | None = None,
                         extra_words: list[str] = (), image_token: str | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: `special_tokens` first (ids 0..), then the task's words and `extra_words`.

    Used for the embedded model and for every random-weight preset, so no tokenizer is ever downloaded."""
    words = list(dict.fromkeys(vocabulary()[len(SPECIAL_TOKENS):] + [w.lower() for w in extra_words]))
    vocab = {w: i for i, w in enumerate(list(special_tokens) + words)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()  # "What" and "what" are one word; answers are lower-case anyway
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    extra = {"image_token": image_token} if image_token else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
                                   extra_special_tokens=extra, padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": [t for t in special_tokens if t not in (bos, eos, unk, pad)]})
    return fast


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The embedded model's tokenizer (LLaVA-1.5 format)."""
    fast = build_word_tokenizer(SPECIAL_TOKENS, unk=UNK, pad=PAD, eos=EOS, bos=BOS, image_token=IMAGE)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_image_processor(image_size: int = 192) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        do_resize=True, size={"shortest_edge": image_size},
        do_center_crop=True, crop_size={"height": image_size, "width": image_size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=IMAGE_MEAN, image_std=IMAGE_STD, do_convert_rgb=True,
    )


def build_processor(image_size: int = 192, patch_size: int = 16) -> LlavaProcessor:
    """A complete LlavaProcessor; <image> expands to (image_size // patch_size)**2 tokens (CLS dropped)."""
    return LlavaProcessor(
        image_processor=build_image_processor(image_size), tokenizer=build_tokenizer(),
        patch_size=patch_size, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE, image_token=IMAGE,
    )
