"""generation_config.json's logits settings under greedy decoding, against HF PyTorch's
generate(do_sample=False), which applies them (a repetition penalty changes the tokens)."""

import dataclasses
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import vicrop_jax
from convert.checkpoint import CheckpointError
from vicrop_jax import prompt_cache
from vicrop_jax.generate import (
    GenerationSettings,
    answer_texts,
    greedy_generate,
    penalise,
    prompt_tokens,
    trim,
)
from vicrop_jax.loading import nchw_to_nhwc
from vicrop_jax.processing import encode, llava_prompt

PENALTY = 1.5
NEW = 8
TEXTS = [
    "<image>\nUSER: What is written on the red circle? Answer the question using a single word "
    "or phrase. ASSISTANT:",
    "<image>\nUSER: how many ASSISTANT:",
]


def _images():
    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))
            for h, w in ((50, 61), (43, 37))]  # fmt: skip


def _with_generation_config(src: str, dst: str, **settings) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "generation_config.json")
    with open(path) as f:
        gen = json.load(f)
    with open(path, "w") as f:
        json.dump({**gen, **settings}, f)
    return dst


@pytest.fixture(scope="module")
def penalised(tiny_llava_dir, tmp_path_factory):
    """The tiny LLaVA checkpoint with a repetition penalty in its generation_config.json:
    ours and HF's, both loaded from the directory."""
    from transformers import LlavaForConditionalGeneration

    d = _with_generation_config(
        tiny_llava_dir[0], str(tmp_path_factory.mktemp("pen") / "ckpt"),
        repetition_penalty=PENALTY,
    )  # fmt: skip
    hf = LlavaForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
    return vicrop_jax.load_model(d), hf


def _hf_tokens(hf, enc, eos):
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(enc["input_ids"]),
            pixel_values=torch.tensor(enc["pixel_values"]),
            attention_mask=torch.tensor(enc["attention_mask"]),
            do_sample=False, max_new_tokens=NEW,
        )  # fmt: skip
    rows = out[:, enc["input_ids"].shape[1] :].tolist()
    return [r[: r.index(eos) + 1] if eos in r else r for r in rows]


def _ours(model, enc):
    out = greedy_generate(
        model.module, model.params, jnp.asarray(enc["input_ids"]),
        nchw_to_nhwc(enc["pixel_values"]), jnp.asarray(enc["attention_mask"]),
        max_new_tokens=NEW, eos_ids=model.config.text_config.eos_ids, pad_id=3,
        generation=model.generation,
    )  # fmt: skip
    return trim(out.tokens, out.lengths)


def test_repetition_penalty_equals_hf_generate(penalised, tiny_llava_dir):
    """A batch of two prompts of different lengths (the second left-padded): ours equals HF
    generate's tokens row by row, and the penalty changes every row."""
    model, hf = penalised
    _, plain = tiny_llava_dir
    assert model.generation == GenerationSettings(repetition_penalty=PENALTY)
    assert hf.generation_config.repetition_penalty == PENALTY
    eos = model.config.text_config.eos_token_id
    imgs = _images()
    enc = model.processor(images=imgs, text=TEXTS, return_tensors="np", padding=True)
    assert (enc["attention_mask"][0] == 1).all() and (enc["attention_mask"][1] == 0).any()
    assert (enc["attention_mask"][:, -1] == 1).all(), "padding must be on the left"
    ours = _ours(model, enc)
    assert ours == _hf_tokens(hf, enc, eos)
    unpenalised = _hf_tokens(plain, enc, eos)
    assert all(a != b for a, b in zip(ours, unpenalised, strict=True))


def test_penalty_over_prompt_and_padding_equals_hf_processor():
    """prompt_tokens + penalise == HF's RepetitionPenaltyLogitsProcessor as generate builds it
    (left padding skipped through prompt_ignore_length, ids past the logits' width dropped),
    on logits of both signs."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    vocab = 23
    ids = rng.integers(0, vocab + 4, (3, 9))  # some ids past the logits' width
    mask = np.ones((3, 9), np.int64)
    mask[1, :4] = 0
    mask[2, :8] = 0
    ids[1, 4:] = np.where(ids[1, 4:] == 5, 6, ids[1, 4:])
    ids[1, :4] = 5  # pad ids, which HF skips
    scores = rng.normal(size=(3, vocab)).astype(np.float32)
    for penalty in (1.3, 0.7):
        start = torch.tensor((mask != 0).argmax(1))
        ref = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=start)(
            torch.tensor(ids), torch.tensor(scores)
        )
        seen = prompt_tokens(jnp.asarray(ids), jnp.asarray(mask), vocab)
        ours = penalise(jnp.asarray(scores), seen, penalty)
        np.testing.assert_array_equal(np.asarray(ours), ref.numpy(), err_msg=str(penalty))
        with_pads = penalise(jnp.asarray(scores), prompt_tokens(jnp.asarray(ids), None, vocab),
                             penalty)  # fmt: skip
        assert not np.array_equal(np.asarray(with_pads)[1], ref.numpy()[1])


def test_shared_prefix_passes_apply_the_penalty_as_full_prompts(penalised, tiny_llava_dir):
    """The shared-prompt cache (prefix + left-padded tails) counts the same prompt tokens as
    the full prompt: baseline and [original, crop] answers equal HF generate's on the full
    prompts, and differ from the unpenalised ones."""
    model, hf = penalised
    _, plain = tiny_llava_dir
    eos = model.config.text_config.eos_token_id
    tok = model.processor.tokenizer
    imgs = _images()
    qs = ["What is written on the red circle?", "how many"]
    crops = [im.crop((3, 4, 30, 33)) for im in imgs]
    pairs = [x for im, c in zip(imgs, crops, strict=True) for x in (im, c)]
    full = encode(model.processor, [llava_prompt(q) for q in qs], imgs)
    full_pair = encode(model.processor, [llava_prompt(q, 2) for q in qs], pairs)

    def hf_answers(m, enc):
        rows = _hf_tokens(m, enc, eos)
        return answer_texts(tok, np.asarray([r + [3] * (NEW - len(r)) for r in rows]),
                            np.asarray([len(r) for r in rows]))  # fmt: skip

    state = prompt_cache.start_answers(model, imgs, qs, max_new_tokens=NEW)
    assert state.answers == hf_answers(hf, full)
    crop_answers = prompt_cache.finish(model, state, crops)
    assert crop_answers == hf_answers(hf, full_pair)
    assert state.answers + crop_answers != hf_answers(plain, full) + hf_answers(plain, full_pair)


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"num_beams": 4}, "num_beams = 4 changes greedy decoding and is not implemented"),
        ({"no_repeat_ngram_size": 3}, "no_repeat_ngram_size = 3"),
        ({"suppress_tokens": [5]}, "suppress_tokens = [5]"),
        ({"penalty_alpha": 0.6, "top_k": 4}, "contrastive search"),
        ({"repetition_penalty": -1.0}, "repetition_penalty must be a positive number"),
        ({"repetition_penalty": "high"}, "repetition_penalty must be a positive number"),
    ],
)
def test_unimplemented_settings_are_refused_at_load(tiny_llava_dir, tmp_path, settings, match):
    d = _with_generation_config(tiny_llava_dir[0], str(tmp_path / "ckpt"), **settings)
    os.remove(os.path.join(d, "model.safetensors"))  # refused before the weights are read
    with pytest.raises(CheckpointError) as e:
        vicrop_jax.load_model(d, processor=False)
    msg = str(e.value)
    assert "\n" not in msg and match in msg and "generation_config.json" in msg, msg


def test_sampling_only_settings_are_accepted():
    """Qwen2.5-VL Instruct's kind of file: sampling settings (ignored by greedy search, as HF
    ignores them under do_sample=False) beside the penalty."""
    gen = {"do_sample": True, "temperature": 0.1, "top_p": 0.001, "top_k": 1,
           "repetition_penalty": 1.05, "eos_token_id": [7, 8], "pad_token_id": 8}  # fmt: skip
    got = GenerationSettings.from_generation_config(gen)
    assert got == GenerationSettings(repetition_penalty=1.05)
    assert dataclasses.asdict(got) == got.identity()


def test_without_the_file_config_json_decides_as_in_transformers(tiny_llava_dir, tmp_path):
    """No generation_config.json: transformers derives the settings from config.json (its
    text config's legacy generation keys too), and so do we."""
    from transformers import LlavaForConditionalGeneration

    d = str(tmp_path / "legacy")
    shutil.copytree(tiny_llava_dir[0], d)
    os.remove(os.path.join(d, "generation_config.json"))
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    config["text_config"].update(repetition_penalty=1.25, num_beams=1, temperature=0.5)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    hf = LlavaForConditionalGeneration.from_pretrained(d)
    assert hf.generation_config.repetition_penalty == 1.25
    assert vicrop_jax.loading.generation_settings(d).repetition_penalty == 1.25
    config["text_config"]["no_repeat_ngram_size"] = 2
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match="config.json: no_repeat_ngram_size = 2"):
        vicrop_jax.load_model(d, processor=False)
