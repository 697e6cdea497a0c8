"""Held-out questions and their accuracy through stock `generate`: what `train-base` reports during and after training."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from par_demo.shapes import QUESTION_TYPES, is_correct, sample_example


def held_out(per_type: int, seed: int) -> list[dict]:
    rng = np.random.default_rng([seed, 7])
    rows = []
    for qtype in QUESTION_TYPES:
        for _ in range(per_type):
            image, _, question, answer = sample_example(qtype, rng)
            rows.append({"image": image, "question": question, "answer": answer, "type": qtype})
    return rows


@torch.no_grad()
def answer_batch(model, processor, images: list, questions: list[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy answers from stock `generate` on the processor's output (left padding when prompts differ)."""
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in questions
    ]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [s.strip() for s in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def accuracy(model, processor, rows: list[dict], batch_size: int = 32, desc: str = "eval") -> dict:
    """Accuracy overall and per type; prompts of equal token length are batched together (no padding)."""
    model.eval()
    by_len: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_len.setdefault(len(processor.tokenizer(r["question"])["input_ids"]), []).append(i)
    correct = [False] * len(rows)
    bar = tqdm(total=len(rows), desc=desc, leave=False)
    for group in by_len.values():
        for s in range(0, len(group), batch_size):
            chunk = group[s:s + batch_size]
            preds = answer_batch(model, processor, [rows[i]["image"] for i in chunk], [rows[i]["question"] for i in chunk])
            for i, p in zip(chunk, preds):
                correct[i] = is_correct(p, rows[i]["answer"])
            bar.update(len(chunk))
    bar.close()
    result = {"overall": sum(correct) / len(rows)}
    for t in QUESTION_TYPES:
        hits = [c for c, r in zip(correct, rows) if r["type"] == t]
        if hits:
            result[t] = sum(hits) / len(hits)
    return result


def format_accuracy(acc: dict) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in acc.items())
