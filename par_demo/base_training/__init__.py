"""How the embedded ShapesVQA LLaVA is trained from scratch on a CPU (`python -m par_demo train-base`).

Training a tiny LLaVA end-to-end on answer tokens alone stays at chance for an hour on 2 cores: the language
model learns the answer priors long before the vision path gets a useful signal. So training is split:

  Stage A  the CLIP vision tower alone, with DENSE per-patch labels (colour, shape, "holds an object centre",
           quadrant of the covering object) read by linear heads from the feature layer LLaVA uses (the last).
           No language model, so a step is cheap, and every patch of every image is a training signal.
  Stage B  the vision tower frozen; its features are precomputed once for a pool of scenes. The projector and
           the Llama LM learn to answer many questions per image at once: the image prefix is shared and each
           question block only sees the prefix and itself (a block-diagonal mask with repeated position ids),
           which is exactly the computation of separate sequences, at a fraction of the cost.

    config.py    the model's architecture and the run's settings (each a `train-base` flag)
    model.py     the model built from transformers' configs, and the tower's features as LLaVA's projector reads them
    scenes.py    the pool of rendered scenes and each patch's labels
    steps.py     learning-rate schedule, AdamW step, bf16 autocast and checkpoints, for both stages
    stage_a.py   stage A: the vision tower and its per-patch heads
    packing.py   stage B's packed batches: token ids, block mask, and where each answer should look and what it reads
    stage_b.py   stage B: the losses (answer, look, read), LayerDrop, and the loop
    held_out.py  held-out questions and their accuracy through stock `generate`

The result is saved with `save_pretrained` (model + processor) and answers with stock `generate`.
"""
