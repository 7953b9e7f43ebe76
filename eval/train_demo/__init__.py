"""Trains the shipped demo model: a small LLaVA on the synthetic small-detail benchmark.

    python -m eval.train_demo --flagfile=eval/flags/train_demo.flags             # stage 1
    python -m eval.train_demo --flagfile=eval/flags/train_demo_bind.flags        # stage 1b
    python -m eval.train_demo --flagfile=eval/flags/train_demo_questions.flags   # stage 1c
    python -m eval.train_demo --flagfile=eval/flags/train_demo_finetune.flags    # stage 2
    python -m eval.train_demo --flagfile=eval/flags/train_demo_crops.flags       # stage 3
    python -m eval.train_demo --flagfile=eval/flags/train_demo_crops.flags --export_only

Every stage flagfile includes train_demo_common.flags (model dims, data) and starts from the
previous stage's workdir; the last exports the model in HF format (config.json,
model.safetensors, tokenizer and LlavaProcessor files), which `vicrop_jax.load_model` reads
through the llava-1.5-7b-hf converter.

The model is this project's Flax LLaVA (CLIP-style ViT, MLP projector, Llama decoder). Each
training item is asked in the pipeline's two prompts: `llava_prompt(q)` with [image] and
`llava_prompt(q, 2)` with [image, crop], the crop drawn like ViCrop's box around the subject
or, for a share of the items, a box that misses it, lies anywhere, shows another object or
cuts a large subject's letter; the answer is always the subject's letter. The loss is the
answer's cross-entropy plus the terms of `losses` the stage weighs: patch labels on the
image features, and the answer query's attention at the rel-att layer pulled onto the
subject (the model is taught where to look, so the demo shows ViCrop's mechanics, not that
a small model learns where to look by itself).

The recipe: stage 1 pretrains the vision tower on patch labels, then trains the whole model
on questions; 1b keeps its vision tower and projector (frozen from then on) under a fresh
decoder, on images of two large shapes asked about both, so only reading the named shape
pays; 1c returns to the full task with one more question per image about another shape;
2 adds the general prompt's and rel-att's map losses, random and look-alike crops, and a
second [image, crop] question about the shape the crop shows; 3 adds crops that cut a
large subject's letter and the [image, crop] answer's attention loss, and exports.

Determinism: item i of the stream is `eval.synthetic.generate_item(seed, i, split="train")`,
its crop drawn from a generator seeded with (seed, i); step s uses items [s * B, (s + 1) * B).
A run resumed from its orbax checkpoint ends with the same params as an uninterrupted one.

Outputs under --workdir: checkpoints/ (params, patch heads, optimizer state, step),
log.jsonl (train records; eval records: exact-match accuracy by size bucket for the full
image, the [image, ground-truth crop] pair and the rel-att ViCrop pipeline), settings.json
(the run's identity: a workdir holding another run is refused), processor/.

Modules: config (TrainConfig, the flags), crops, data (items and batches), losses, state
(optimizer, checkpoints, starting state), train (the loop), probes (held-out eval and
probes), export (the HF files; every converter call).
"""
