"""The smoke demo: load a LLaVA checkpoint, ask a question about a synthetic image.

python -m vicrop_jax.demo                 # tiny random model built on the fly
python -m vicrop_jax.demo --model DIR     # any llava-1.5 style checkpoint directory
"""

from __future__ import annotations

import tempfile
import time

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw

import vicrop_jax
from vicrop_jax.generate import greedy_generate, trim
from vicrop_jax.loading import nchw_to_nhwc

_MODEL = flags.DEFINE_string("model", None, "HF checkpoint directory; default: a tiny random one")
_QUESTION = flags.DEFINE_string("question", "What is written on the red circle?", "question")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 8, "tokens to generate")


def synthetic_image(size=(320, 240)) -> Image.Image:
    img = Image.new("RGB", size, (235, 235, 225))
    d = ImageDraw.Draw(img)
    d.ellipse((200, 40, 260, 100), fill=(220, 30, 30))
    d.text((215, 62), "42", fill=(255, 255, 255))
    d.rectangle((30, 150, 110, 210), fill=(30, 60, 200))
    return img


def main(argv):
    del argv
    path = _MODEL.value
    if path is None:
        from vicrop_jax.tiny import make_random_checkpoint

        path = make_random_checkpoint(tempfile.mkdtemp(prefix="vicrop_tiny_"))
        print(f"built a tiny random LLaVA checkpoint in {path}")
    t0 = time.perf_counter()
    model = vicrop_jax.load_model(path)
    print(f"loaded {model.family} in {time.perf_counter() - t0:.2f}s")
    prompt = f"<image>\nUSER: {_QUESTION.value} Answer the question using a single word or phrase. ASSISTANT:"  # noqa: E501
    inp = model.processor(images=synthetic_image(), text=prompt, return_tensors="np")
    t0 = time.perf_counter()
    out = greedy_generate(
        model.module, model.params, jnp.asarray(inp["input_ids"]),
        nchw_to_nhwc(inp["pixel_values"]), jnp.asarray(inp["attention_mask"]),
        max_new_tokens=_MAX_NEW.value, eos_ids=model.config.text_config.eos_ids,
        pad_id=model.processor.tokenizer.pad_token_id or 0,
    )  # fmt: skip
    tokens = trim(out.tokens, out.lengths)[0]
    dt = time.perf_counter() - t0
    answer = model.processor.tokenizer.decode(tokens, skip_special_tokens=True)
    ids = np.asarray(inp["input_ids"][0])
    img_pos = ids == model.config.image_token_index
    att = np.asarray(out.prefill.attentions[:, 0, :, : ids.shape[0]])[..., img_pos]  # [L, N, T]
    print(f"answer: {answer!r} ({len(tokens)} tokens, {dt:.2f}s incl. compile)")
    print(f"answer-to-image attention mass per layer: {np.round(att.mean(1).sum(-1), 3)}")


if __name__ == "__main__":
    app.run(main)
