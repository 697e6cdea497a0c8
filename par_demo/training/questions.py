"""Where training queries come from: a JSONL of (image, question), or a folder of photos and a built-in question bank.

PAR's self-supervision needs no answers, only images and questions, and a user deploying the app has photos, not
questions. For a folder, every image gets `questions_per_image` questions drawn from a varied bank of generic
prompts (describe, count, colours, positions, reading text, yes/no) whose slots are filled with what the frozen
model itself said about the image: it is first asked a few open questions ("What objects are in this image?"), and
the content words of its answers become the objects and colours the other questions ask about. So the questions
speak about what the model sees (and, with a colour or object it did not mention, about what it does not see),
in its own words, whatever the domain of the photos. The answers are never needed: the frozen model's own answer
to each question is the training target (`targets.py`).
"""

from __future__ import annotations

import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from par_demo.errors import UserError
from par_demo.images import check_file
from par_demo.shapes import load_jsonl

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}

# Asked first, of every image: their answers name the objects and colours the bank's questions then ask about.
PROBES = (
    "Describe the image in one sentence.",
    "What objects are in this image?",
    "What is the main object in this image?",
    "What color is the main object?",
)

COLOR_WORDS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray",
               "grey", "violet", "cyan", "magenta", "beige", "gold", "silver")
# "No" questions need objects that are usually absent; common ones, so that a real model understands them.
COMMON_OBJECTS = ("person", "dog", "cat", "car", "tree", "chair", "table", "bottle", "book", "cup", "phone", "bird",
                  "bicycle", "clock", "window", "sign")
STOP_WORDS = set("""a an the and or of in on at to is are was were be been it its this that these those there here
with without for from by as into onto over under above below near next image picture photo photograph shows showing
show one two three four five six seven eight nine ten some many several few very small large big left right top
bottom middle center side front back main object objects thing things color colour colors yes no not i you he she
they we my your his her their what which who where when how also has have had can see seen""".split())

# Templates by kind. {x}: an object the model mentioned, {c}: a colour it mentioned, {o}: a common object,
# {d}: a colour it did not mention. Each kind is drawn equally often; a template whose slots cannot be filled is
# redrawn.
TEMPLATES = {
    "describe": ("Describe the image.", "Describe this image in detail.", "What is in the image?",
                 "What is happening in this picture?", "What is the {x} doing?", "Describe the {x}."),
    "count": ("How many objects are there?", "How many {x}s are there?", "How many people are in the image?",
              "How many {c} objects are there?", "Is there more than one {x}?"),
    "colours": ("What color is the {x}?", "What colors are in the image?", "What is the main color of the image?",
                "What is the {c} object?", "What shape is the {c} object?", "Is the {x} {c}?"),
    "positions": ("Where is the {x}?", "Is the {x} on the left or on the right?", "What is on the left side?",
                  "What is on the right side?", "What is at the top of the image?", "What is next to the {x}?",
                  "Where is the {c} {x}?"),
    "text": ("What does the text in the image say?", "Is there any text in the image?", "What is written on the {x}?",
             "What number is shown in the image?", "Read the text in the image."),
    "yes/no": ("Is there a {x} in the image?", "Is there a {c} {x}?", "Is there a {o} in the image?",
               "Is there a {d} {x}?", "Is the {x} in the image {d}?", "Are there any {o}s?"),
}


@dataclass
class Mentions:
    """What the frozen model said about one image: content words of its answers to the probes."""

    objects: list[str]
    colors: list[str]


def mentions_in(answers: list[str]) -> Mentions:
    objects, colors = [], []
    for answer in answers:
        for word in re.findall(r"[a-z]+", answer.lower()):
            if word in COLOR_WORDS:
                colors.append(word)
            elif len(word) > 2 and word not in STOP_WORDS:
                objects.append(word)
    return Mentions(list(dict.fromkeys(objects)), list(dict.fromkeys(colors)))


def draw_question(mentions: Mentions, rng: random.Random) -> str:
    """One question of the bank: a kind, then a template of it whose slots the mentions can fill."""
    absent = [c for c in COLOR_WORDS if c not in mentions.colors] or list(COLOR_WORDS)
    while True:
        template = rng.choice(TEMPLATES[rng.choice(list(TEMPLATES))])
        if "{x}" in template and not mentions.objects or "{c}" in template and not mentions.colors:
            continue
        return template.format(x=rng.choice(mentions.objects or ["object"]), c=rng.choice(mentions.colors or ["red"]),
                               o=rng.choice(COMMON_OBJECTS), d=rng.choice(absent))


class QuestionBank:
    """Questions for images without any: the model is probed once per image (cached), then questions are drawn."""

    def __init__(self, answer, seed: int = 0):
        self.answer = answer  # (image path, question) -> the frozen model's greedy answer text
        self.seed = seed
        self.mentions: dict[str, Mentions] = {}

    def mentions_of(self, image: str) -> Mentions:
        if image not in self.mentions:
            self.mentions[image] = mentions_in([self.answer(image, probe) for probe in PROBES])
        return self.mentions[image]

    def question(self, image: str, slot: int) -> str:
        # Seeded by image and slot: every process, and a resumed run, asks the same question of the same query.
        rng = random.Random(f"{self.seed}/{image}/{slot}")
        return draw_question(self.mentions_of(image), rng)


@dataclass(frozen=True)
class QuerySpec:
    """One training query: an image and its question, or, for a photo folder, the slot of the bank's question."""

    image: str
    question: str | None = None
    slot: int = 0


def find_images(folder: Path) -> list[Path]:
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder} or its subfolders")
    return images


def read_queries(data=None, images=None, questions_per_image: int = 2, seed: int = 0) -> list[QuerySpec]:
    """Queries from a JSONL file (image + question per line; answers are not read) or from an image folder
    (`questions_per_image` questions of the bank each, drawn when first used). Shuffled images, so that a held-out
    share of them is a fair sample."""
    if (data is None) == (images is None):
        raise UserError("give either --data (a JSONL with image + question per line) or --images (a photo folder)")
    if images is not None:
        folder = Path(images)
        if not folder.is_dir():
            raise UserError(f"--images must be a folder of images; not found: {folder}")
        paths = find_images(folder)
        random.Random(seed).shuffle(paths)
        return readable([QuerySpec(str(p), None, slot) for p in paths for slot in range(questions_per_image)])
    path = Path(data)
    if path.is_dir():  # the command used to take a folder through --data
        raise UserError(f"{path} is a folder: pass it as --images to train from photos without questions")
    if not path.is_file():
        raise UserError(f"--data must be a JSONL file with image + question per line; not found: {path}")
    return readable([QuerySpec(row["image"], row["question"])
                     for row in load_jsonl(path, require=("image", "question"))])


def readable(queries: list[QuerySpec]) -> list[QuerySpec]:
    """The queries whose image file can be read (checked from its header), so that one broken file among thousands
    of photos cannot stop a run hours in when it is drawn; the others are left out, said in one line."""
    images, refused = dict.fromkeys(q.image for q in queries), {}
    for image in images:
        try:
            check_file(image, f"'{Path(image).name}'")
        except UserError as exc:
            refused[image] = str(exc)
    if not refused:
        return queries
    first = next(iter(refused.values()))
    if len(refused) == len(images):
        raise UserError(f"none of the {len(images)} images can be read; the first: {first}")
    print(f"left out {len(refused)} of {len(images)} images that cannot be read; the first: {first}", file=sys.stderr)
    return [q for q in queries if q.image not in refused]
