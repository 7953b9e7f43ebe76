"""The shipped demo model (vicrop_jax/assets/demo): HF-format files, loaded by transformers'
LlavaForConditionalGeneration and by vicrop_jax through the llava-1.5 converter, and the
same greedy answers from both on 50 held-out questions (single image and [image, crop])."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import vicrop_jax
from eval import synthetic as syn
from eval.demo import DEMO_MODEL, SIZES
from eval.train_demo.crops import gt_crop
from vicrop_jax.pipeline import generate_answers
from vicrop_jax.processing import llava_prompt

N = 50


@pytest.fixture(scope="module")
def shipped():
    from transformers import LlavaForConditionalGeneration

    model = vicrop_jax.load_model(DEMO_MODEL)
    hf = LlavaForConditionalGeneration.from_pretrained(DEMO_MODEL, dtype=torch.float32)
    hf.eval()
    sizes = tuple(int(v) for v in SIZES.split(","))  # the demo's held-out set
    items = [syn.generate_item(1, i, split="test", glyphs="letter", sizes=sizes)
             for i in range(N)]  # fmt: skip
    return model, hf, items


def test_files_and_size():
    names = set(os.listdir(DEMO_MODEL))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json"} <= names, names  # fmt: skip
    total = sum(os.path.getsize(os.path.join(DEMO_MODEL, n)) for n in names)
    assert total <= 25 * 2**20, total


def _hf_answers(hf, processor, prompts, images, per_prompt):
    out = []
    for i, prompt in enumerate(prompts):
        enc = processor(images=images[i * per_prompt : (i + 1) * per_prompt], text=[prompt],
                        return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            gen = hf.generate(**enc, do_sample=False, max_new_tokens=3)
        new = gen[0, enc["input_ids"].shape[1] :]
        out.append(processor.tokenizer.decode(new, skip_special_tokens=True).strip())
    return out


def test_hf_torch_and_vicrop_jax_give_the_same_answers(shipped):
    model, hf, items = shipped
    images = [im for im, _ in items]
    recs = [r for _, r in items]
    single = [llava_prompt(r["question"]) for r in recs]
    ours = generate_answers(model, single, images, 3)
    ref = _hf_answers(hf, model.processor, single, images, 1)
    assert ours == ref
    base = model.config.vision_config.image_size
    pairs = []
    for im, r in items:
        pairs += [im, im.crop(gt_crop(r["bbox"], im.size, base))]
    double = [llava_prompt(r["question"], 2) for r in recs]
    ours2 = generate_answers(model, double, pairs, 3)
    assert ours2 == _hf_answers(hf, model.processor, double, pairs, 2)
    # The model is trained: it reads large subjects and, given the crop, small ones too.
    truth = np.array([r["answer"] for r in recs])
    large = np.array([r["size_bucket"] == "large" for r in recs])
    small = np.array([r["size_bucket"] == "small" for r in recs])
    assert np.mean(np.array(ours)[large] == truth[large]) >= 0.4
    assert np.mean(np.array(ours2)[small] == truth[small]) >= 0.6


def test_rel_att_vicrop_helps_small_subjects_and_matches_hf_on_its_crops(shipped):
    # The whole rel-att pipeline (the shared-prefix path) on the 50 questions: HF torch gives
    # the same answers on [image, our rel-att crop], and the crop lifts the small bucket.
    from vicrop_jax.pipeline import ask_batch

    model, hf, items = shipped
    images = [im for im, _ in items]
    recs = [r for _, r in items]
    answers = ask_batch(model, images, [r["question"] for r in recs], max_new_tokens=3)
    pairs = [x for im, a in zip(images, answers, strict=True) for x in (im, im.crop(a.bbox))]
    double = [llava_prompt(r["question"], 2) for r in recs]
    assert [a.crop_answer for a in answers] == _hf_answers(hf, model.processor, double, pairs, 2)
    truth = np.array([r["answer"] for r in recs])
    small = np.array([r["size_bucket"] == "small" for r in recs])
    base = np.array([a.original_answer for a in answers])[small] == truth[small]
    vicrop = np.array([a.crop_answer for a in answers])[small] == truth[small]
    assert vicrop.mean() >= base.mean() + 0.2, (base.mean(), vicrop.mean())
