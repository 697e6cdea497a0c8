"""Self-supervised training of the PAR meta-router (`python -m par_demo train-router`).

    questions.py  where queries come from: a JSONL of questions, or a photo folder and the built-in question bank
    targets.py    the frozen model's own answer and distributions per query (the only target)
    flows.py      pruning flows within a budget, and scoring many of them in one batched forward
    loop.py       preference loss, the data-parallel loop (accelerate), checkpoints, --resume, --max-minutes
    pareto.py     the (tokens, layers) split per budget measured on held-out queries, saved with the router
"""
