"""Stage B's batches: many questions per image packed behind one shared image prefix, with what each answer position
should look at and read there."""

from __future__ import annotations

import numpy as np
import torch

from par_demo.base_training.config import GRID
from par_demo.base_training.scenes import COLOR_NAMES, IGNORE, Pool
from par_demo.shapes import COLORS, MAX_OBJECTS, QUADRANTS, QUESTION_TYPES, SHAPES, quadrant, sample_question


class QuestionPacker:
    """Turns (image index, questions) into packed token ids, position ids, a block mask and loss targets."""

    def __init__(self, processor, questions_per_image: int, grid: int = GRID):
        self.tok = processor.tokenizer
        self.q = questions_per_image
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "QUESTION"}]}],
            add_generation_prompt=True,
        )
        head, tail = prompt.split("QUESTION")
        image_token = self.tok.convert_tokens_to_ids("<image>")
        head_ids = self.tok(head)["input_ids"]  # <s> user : <image>
        i = head_ids.index(image_token)
        self.prefix = head_ids[:i] + [image_token] * (grid * grid) + head_ids[i + 1:]
        self.image_start = i
        self.tail = self.tok(tail, add_special_tokens=False)["input_ids"]  # assistant :
        self.block_len = 12
        self.cache: dict[str, list[int]] = {}

    def words(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self.cache[text]

    def block(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """Token ids of one block and its targets (answer tokens then </s>, predicted from the position before)."""
        prompt = self.words(question) + self.tail
        answer_ids = self.words(answer) + [self.tok.eos_token_id]
        ids = prompt + answer_ids
        targets = [IGNORE] * (len(prompt) - 1) + answer_ids + [IGNORE]
        pad = self.block_len - len(ids)
        assert pad >= 0, question
        return ids + [self.tok.pad_token_id] * pad, targets + [IGNORE] * pad

    def layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids and the boolean attention mask shared by every packed sequence."""
        p, b, q = len(self.prefix), self.block_len, self.q
        total = p + b * q
        mask = torch.zeros(total, total, dtype=torch.bool)
        mask[:p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
        pos = list(range(p))
        for j in range(q):
            s = p + j * b
            mask[s:s + b, :p] = True
            mask[s:s + b, s:s + b] = torch.ones(b, b, dtype=torch.bool).tril()
            pos += list(range(p, p + b))
        return torch.tensor(pos), mask

    def batch(self, pool: Pool, idx: np.ndarray, rng: np.random.Generator):
        """Token ids and targets, and the supervised answer positions ("queries"): for each, the sequence it is
        in, its position, where it should look and what it should read there.

        Every question's first answer position is a query; a "where" question's second one too: "left"/"right"
        is predicted after "top"/"bottom" and needs the object's quadrant just as much."""
        ids, targets, rows, queries, looks, reads = [], [], [], [], [], []
        per_type = self.q // len(QUESTION_TYPES)
        for row, i in enumerate(idx):
            seq, tgt = list(self.prefix), [IGNORE] * len(self.prefix)
            for qtype in [t for t in QUESTION_TYPES for _ in range(per_type)]:
                qa = sample_question(pool.objects[i], qtype, rng)
                while qa is None:  # this scene cannot ask that type: ask an askable one instead
                    qtype = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
                    qa = sample_question(pool.objects[i], qtype, rng)
                b_ids, b_tgt = self.block(*qa)
                first = len(seq) + len(self.words(qa[0])) + len(self.tail) - 1
                look = self.look_target(qtype, qa[0], pool.labels[i])
                read = read_target(qtype, qa[0], pool.objects[i])
                for position in ([first, first + 1] if qtype == "where" else [first]):
                    rows.append(row), queries.append(position), looks.append(look), reads.append(read)
                seq += b_ids
                tgt += b_tgt
            ids.append(seq)
            targets.append(tgt)
        return (torch.tensor(ids), torch.tensor(targets), torch.tensor(rows), torch.tensor(queries),
                torch.from_numpy(np.stack(looks)), torch.tensor(reads))

    def look_target(self, qtype: str, question: str, labels: np.ndarray) -> np.ndarray:
        """Where the answer position should look: a distribution over the prefix tokens.

        Uniform over the patches of the object(s) the question is about; counting questions look at object
        centres plus <s>, so the share left on <s> encodes the count; nothing to find (a "no", a zero) means <s>.
        """
        words = question.lower().rstrip("?").split()
        color = next((COLOR_NAMES.index(w) + 1 for w in words if w in COLORS), None)
        shape = next((SHAPES.index(w.rstrip("s")) + 1 for w in words if w.rstrip("s") in SHAPES), None)
        hit = np.ones(len(labels), dtype=bool)
        if qtype in ("count_shape", "count_all"):
            hit &= labels[:, 2] == 1
        if color is not None and qtype != "color":
            hit &= labels[:, 0] == color
        if shape is not None and qtype != "shape":
            hit &= labels[:, 1] == shape
        target = np.zeros(len(self.prefix), dtype=np.float32)
        target[self.image_start:self.image_start + len(labels)] = hit
        if qtype in ("count_shape", "count_all") or not hit.any():
            target[0] = 1.0  # <s>, the attention sink
        return target / target.sum()


def read_target(qtype: str, question: str, objects: list[dict]) -> list[int]:
    """What the look head must carry back: colour, shape and quadrant of the object the question is about, or
    for counting questions the count.

    Index 0 means "no such object" (a "no" to an existence question); what a question does not ask is IGNORE.
    """
    words = question.lower().rstrip("?").split()
    color = next((w for w in words if w in COLORS), None)
    shape = next((w.rstrip("s") for w in words if w.rstrip("s") in SHAPES), None)
    hits = [o for o in objects if color in (None, o["color"]) and shape in (None, o["shape"])]
    if qtype in ("count_shape", "count_all"):
        return [IGNORE, IGNORE, IGNORE, len(hits)]
    if not hits:
        return [0, 0, 0, IGNORE]
    obj = hits[0]
    quad = quadrant(obj)
    return [COLOR_NAMES.index(obj["color"]) + 1, SHAPES.index(obj["shape"]) + 1,
            IGNORE if quad is None else QUADRANTS.index(quad) + 1, IGNORE]


READ_SIZES = (len(COLORS) + 1, len(SHAPES) + 1, len(QUADRANTS) + 1, MAX_OBJECTS + 1)
