"""The sharded runs of tests/test_mesh.py, with 8 forced CPU devices.

  python -m tests.mesh_check OUT_DIR [FAMILY ...] [--full]

For each family (llava, instructblip, llava_next, qwen2_5_vl; default all) a tiny random
checkpoint whose head, key/value head, MLP and vocabulary counts divide 8 is written to
OUT_DIR/<family>, then loaded on one device and on (data, model) meshes; each run writes
OUT_DIR/<family>_<d>x<m>.npz (one device: _ref) with the forward logits, the baseline
answers, its methods' maps and boxes (high-resolution tiles included), their crop answers
where asked, and the layouts seen. With llava, OUT_DIR/refusals.json holds the one-line
errors of meshes that must be refused and OUT_DIR/smoke.json what `eval.run
--mesh_shape=model:8` wrote. The test compares the files.

Every program compiles anew per mesh (one to three seconds of CPU each here), so CI runs
PLAN: on every mesh the logits, the baseline answers and at least one method; each method on
one mesh that splits the params per family, rotated over the families; crop answers on one
mesh per family (CROP). `--full` runs every method with its crop answers on every mesh.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

if "jax" not in sys.modules:
    os.environ.setdefault(
        "XLA_FLAGS",
        # Few-op programs on a CPU: the fast compile, not the fast run.
        "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
        "--xla_llvm_disable_expensive_passes=true",
    )

import jax
import numpy as np
from PIL import Image

jax.config.update("jax_default_matmul_precision", "highest")

MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))
METHODS = ("rel_att", "grad_att", "pure_grad", "rel_att_high")
# {family: {mesh: the methods run there}}. Every run gives the forward logits and the
# baseline answers (greedy decoding); a method gives its maps and boxes, and on the family's
# CROP mesh its [original, crop] answers too (ViCrop end to end; elsewhere they would only
# compile one more greedy decode per mesh). Each method runs for each family on a mesh that
# splits the params ((4, 2), (2, 4), (1, 8)), rotated over the families so that each method
# meets each of those meshes; (8, 1) is data parallelism alone. LLaVA's answers on (1, 8)
# take the shared-prompt cache (its batches are not split), every other mesh the separate
# passes with batches split over data.
PLAN = {
    "llava": {(8, 1): ("rel_att",), (4, 2): ("grad_att",), (2, 4): ("pure_grad",),
              (1, 8): ("rel_att", "rel_att_high")},
    "instructblip": {(8, 1): ("rel_att",), (4, 2): ("rel_att_high",),
                     (2, 4): ("rel_att", "grad_att"), (1, 8): ("pure_grad",)},
    "llava_next": {(8, 1): ("rel_att",), (4, 2): ("pure_grad", "rel_att"),
                   (2, 4): ("rel_att_high",), (1, 8): ("grad_att",)},
    "qwen2_5_vl": {(8, 1): ("rel_att",), (4, 2): ("rel_att",), (2, 4): ("grad_att",),
                   (1, 8): ("pure_grad", "rel_att_high")},
}  # fmt: skip
CROP = {"llava": (1, 8), "instructblip": (2, 4), "llava_next": (4, 2), "qwen2_5_vl": (1, 8)}
FULL_PLAN = {f: dict.fromkeys(MESHES, METHODS) for f in PLAN}
FULL_CROP = dict.fromkeys(PLAN, MESHES)
BATCH = 8  # questions per call: a multiple of every data axis
MAX_NEW = 3
# (width, height) of the three test images (one size: one compiled shape of each map, mask
# and box search), and the high-res tile side that splits each into 2 x 2 tiles:
# Qwen2.5-VL's box search works at 224 px and its processor refuses tiles under 56 x 56.
IMAGE_SIZE = {"default": (80, 60), "qwen2_5_vl": (320, 240)}
TILE = {"default": 40, "qwen2_5_vl": 160}
QUESTIONS = ("What is written on the red circle?", "What color is the square?",
             "How many are there in this picture?")  # fmt: skip
# Text config of every family: 16 heads of 4 over 8 key/value heads (GQA), MLP 56.
TEXT = {"hidden_size": 64, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 4,
        "intermediate_size": 56, "num_hidden_layers": 1}  # fmt: skip


def _vocab(tokenizer) -> int:
    return -(-len(tokenizer) // 8) * 8


def random_params(abstract, seed: int, scale: float):
    """Random params of an abstract tree, with no program compiled: norm scales near 1,
    biases and embeddings near 0, kernels ~ N(0, 1 / fan_in), every one off its init value
    by `scale` (as tests/hf_reference perturbs HF's init)."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        noise = scale * rng.standard_normal(x.shape).astype(np.float32)
        if name == "scale":
            return 1 + noise
        if name == "kernel":
            fan_in = int(np.prod(x.shape[:-1]))
            return rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(fan_in) + noise
        return noise

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _save(out_dir: str, hf: dict, family: str, scale: float) -> str:
    from convert.checkpoint import save_safetensors
    from vicrop_jax.families import get_family
    from vicrop_jax.loading import parse_config

    fam = get_family(family)
    config = parse_config(hf)
    params = random_params(fam.abstract_params(config, np.float32), 1, scale)
    save_safetensors(fam.converter.export_params(params), out_dir, hf)
    return out_dir


def make_llava(out_dir: str) -> str:
    from vicrop_jax import testing

    os.makedirs(out_dir, exist_ok=True)
    tok = testing.build_tokenizer(out_dir)
    testing.build_processor(out_dir, tok)
    hf = testing.hf_config_dict(image_token_index=tok.convert_tokens_to_ids("<image>"),
                                vocab_size=_vocab(tok))  # fmt: skip
    hf["text_config"].update(TEXT)
    hf["vision_config"]["num_hidden_layers"] = 1
    return _save(out_dir, hf, "llava", 0.05)


def make_instructblip(out_dir: str) -> str:
    from vicrop_jax import testing

    os.makedirs(out_dir, exist_ok=True)
    tok, qtok = testing.build_instructblip_tokenizers(out_dir)
    testing.build_instructblip_processor(out_dir, tok, qtok)
    hf = testing.instructblip_config_dict(image_token_index=tok.convert_tokens_to_ids("<image>"),
                                          vocab_size=_vocab(tok), text_layers=1,
                                          qformer_layers=1)  # fmt: skip
    hf["text_config"].update(TEXT)
    hf["vision_config"]["num_hidden_layers"] = 1
    return _save(out_dir, hf, "instructblip", 0.2)


def make_llava_next(out_dir: str) -> str:
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    from vicrop_jax import testing

    os.makedirs(out_dir, exist_ok=True)
    tok = testing.build_tokenizer(out_dir)
    pinpoints = [[35, 70], [70, 35], [70, 70]]
    LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": testing.IMAGE},
            crop_size={"height": testing.IMAGE, "width": testing.IMAGE},
            image_grid_pinpoints=pinpoints,
        ),
        tokenizer=tok, patch_size=testing.PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token="<image>",
    ).save_pretrained(out_dir)  # fmt: skip
    hf = testing.hf_config_dict(image_token_index=tok.convert_tokens_to_ids("<image>"),
                                vocab_size=_vocab(tok))  # fmt: skip
    hf.update(model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"],
              image_grid_pinpoints=pinpoints)  # fmt: skip
    hf.pop("image_seq_length")
    hf["text_config"].update(TEXT)
    hf["vision_config"]["num_hidden_layers"] = 1
    return _save(out_dir, hf, "llava_next", 0.05)


# Qwen2.5-VL's text config: its head size follows from hidden / heads (8, M-RoPE sections
# 2 + 1 + 1); 16 heads over 8 key/value heads, MLP 56, as TEXT.
QWEN_TEXT = {"hidden_size": 128, "num_attention_heads": 16, "num_key_value_heads": 8,
             "intermediate_size": 56, "num_hidden_layers": 1,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 1, 1]}}  # fmt: skip
QWEN_MAX_PIXELS = 28 * 28 * 16  # at most 16 merged tokens an image


def make_qwen2_5_vl(out_dir: str) -> str:
    from tests.hf_reference import qwen2_5_vl_config_dict
    from vicrop_jax import testing

    os.makedirs(out_dir, exist_ok=True)
    tok = testing.build_qwen2_5_vl_processor_files(out_dir)
    ids = {k: tok.convert_tokens_to_ids(f"<|{k}|>")
           for k in ("image_pad", "video_pad", "vision_start", "vision_end", "im_end")}  # fmt: skip
    hf = qwen2_5_vl_config_dict()
    hf.update(image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
              vision_start_token_id=ids["vision_start"],
              vision_end_token_id=ids["vision_end"])  # fmt: skip
    hf["vision_config"].update(patch_size=14, window_size=56, depth=1, fullatt_block_indexes=[0],
                               out_hidden_size=QWEN_TEXT["hidden_size"])  # fmt: skip
    hf["text_config"].update(QWEN_TEXT, vocab_size=_vocab(tok), eos_token_id=ids["im_end"],
                             bos_token_id=None, pad_token_id=tok.pad_token_id)  # fmt: skip
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [ids["im_end"], tok.pad_token_id],
                   "pad_token_id": tok.pad_token_id, "do_sample": False,
                   "repetition_penalty": 1.05}, f)  # fmt: skip
    return _save(out_dir, hf, "qwen2_5_vl", 0.05)


MAKERS = {"llava": make_llava, "instructblip": make_instructblip, "llava_next": make_llava_next,
          "qwen2_5_vl": make_qwen2_5_vl}  # fmt: skip
# load_model's processor_options per family.
PROCESSOR_OPTIONS = {"qwen2_5_vl": {"max_pixels": QWEN_MAX_PIXELS}}


def images(family: str) -> list[Image.Image]:
    """The three test images of a family (IMAGE_SIZE), random pixels."""
    rng = np.random.default_rng(5)
    w, h = IMAGE_SIZE.get(family, IMAGE_SIZE["default"])
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)) for _ in range(3)]


def logits(model, mesh) -> np.ndarray:
    """Forward logits of the three questions' prompts (one image each), float32[3, S, V]."""
    from vicrop_jax.families import family_of
    from vicrop_jax.loading import forward

    fam = family_of(model)
    enc = fam.encode(model.processor, [fam.prompt(q) for q in QUESTIONS], images(fam.name), 8)
    kw = {k: v for k, v in enc.items()
          if k.startswith("qformer_") or k in ("image_sizes", "image_grid_thw")}  # fmt: skip
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        out = forward(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"], **kw)
    return np.asarray(out.logits)


def run(path: str, family: str, mesh, methods=METHODS, crop=METHODS) -> dict:
    """The results a mesh must reproduce, as arrays, plus the layouts seen: the logits, the
    baseline answers, each method's maps and boxes, and the crop answers of the methods in
    `crop`."""
    from eval.engine import Engine
    from vicrop_jax.loading import load_model
    from vicrop_jax.pipeline import StageTimer, answer_batch, map_boxes

    model = load_model(path, mesh=mesh, processor_options=PROCESSOR_OPTIONS.get(family))
    out = {"logits": logits(model, mesh)}
    if mesh is not None:
        q = model.params["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
        out["q_proj_spec"] = np.array(str(q.sharding.spec))
        out["q_proj_shape"] = np.array(q.shape)
        out["q_proj_shard"] = np.array(q.addressable_shards[0].data.shape)
    ex = Engine(model, batch_size=BATCH, max_new_tokens=MAX_NEW, mesh=mesh).executor
    ims, qs = images(family), list(QUESTIONS)
    tile = TILE.get(family, TILE["default"])
    cropped = [m for m in methods if m in crop]
    baseline, results = answer_batch(ex, ims, qs, cropped, high_res_threshold=tile)
    out["answers"] = np.array(baseline)
    for m, res in results.items():
        out[f"{m}/crop_answer"] = np.array(res.crop_answers)
    for m in methods:
        if m in results:
            boxes, maps = results[m].boxes, results[m].maps
        else:
            boxes, maps = map_boxes(ex, m, ims, qs, StageTimer(), tile)
        for i, a in enumerate(maps):  # maps differ in shape per image (*_high, Qwen)
            out[f"{m}/map{i}"] = a
        out[f"{m}/box"] = np.array(boxes)
    out["shared_prefix"] = np.array(ex.shares_prefix(len(QUESTIONS)))
    if mesh is not None and out["shared_prefix"]:  # the baseline's pass again: compiled
        state = ex.start(ims, qs, with_map="rel_att" in cropped)
        out["cache_spec"] = np.array(str(state.cache.k[0].sharding.spec))
    return out


def refusals(root: str) -> dict:
    """The one-line errors of meshes that must be refused before any weight is read: the
    llava checkpoint's config with 6 heads (model axis 4), and its weights file replaced by
    garbage (so a read would fail differently)."""
    from vicrop_jax.loading import load_model
    from vicrop_jax.sharding import make_mesh

    out = {}
    src = os.path.join(root, "llava")
    bad = os.path.join(root, "refused")
    os.makedirs(bad, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        hf = json.load(f)
    cases = {"num_attention_heads": {"num_attention_heads": 6, "num_key_value_heads": 2},
             "vocab_size": {"vocab_size": 130}}  # fmt: skip
    for name, change in cases.items():
        hf_bad = json.loads(json.dumps(hf))
        hf_bad["text_config"].update(change)
        with open(os.path.join(bad, "config.json"), "w") as f:
            json.dump(hf_bad, f)
        with open(os.path.join(bad, "model.safetensors"), "wb") as f:
            f.write(b"not a safetensors file")
        try:
            load_model(bad, mesh=make_mesh("data:2,model:4"), processor=False)
            out[name] = None
        except Exception as e:  # noqa: BLE001 - the test reads the type and message
            out[name] = f"{type(e).__name__}: {e}"
    return out


def smoke(root: str) -> dict:
    """`eval.run --mesh_shape=model:8` on 8 questions with the llava checkpoint (its flags
    parsed as the command line does; rel_att at the batch size of PLAN's (1, 8) run, whose
    programs it may reuse). Returns the records and the log lines."""
    import io

    from absl import flags

    from eval import records
    from eval import run as run_cli
    from tests.test_eval_datasets import write_unified

    spec = write_unified(os.path.join(root, "smoke_data"), n=8)
    out = os.path.join(root, "smoke_run")
    argv = [
        "eval.run",
        f"--model={os.path.join(root, 'llava')}",
        "--task=gqa",
        f"--data_json={spec.data_json}",
        f"--image_root={spec.image_root}",
        "--methods=rel_att",
        f"--output_dir={out}",
        "--mesh_shape=model:8",
        "--smoke",
        f"--batch_size={BATCH}",
        f"--max_new_tokens={MAX_NEW}",
        "--noprogress",
    ]
    flags.FLAGS(argv)
    log = io.StringIO()
    with contextlib.redirect_stderr(log), contextlib.redirect_stdout(io.StringIO()):
        run_cli.main(argv[:1])
    recs = records.read_records(records.result_files(out)[0])
    return {"records": recs, "log": log.getvalue()}


def main(root: str, families=tuple(PLAN), full: bool = False) -> None:
    """Writes each family's runs (its PLAN, or FULL_PLAN) under root; with llava, the
    refusals and the eval.run smoke run too."""
    from vicrop_jax.sharding import make_mesh

    assert len(jax.devices()) == 8, jax.devices()
    for family in families:
        plan = (FULL_PLAN if full else PLAN)[family]
        crop = FULL_CROP[family] if full else (CROP[family],)
        path = MAKERS[family](os.path.join(root, family))
        wanted = tuple(m for m in METHODS if any(m in ms for ms in plan.values()))
        cropped = tuple(m for m in METHODS if any(m in plan[c] for c in crop))
        res = run(path, family, None, wanted, cropped)
        np.savez(os.path.join(root, f"{family}_ref.npz"), **res)
        for (d, m), methods in plan.items():
            res = run(path, family, make_mesh((d, m)), methods, methods if (d, m) in crop else ())
            np.savez(os.path.join(root, f"{family}_{d}x{m}.npz"), **res)
        if family == "llava":
            with open(os.path.join(root, "refusals.json"), "w") as f:
                json.dump(refusals(root), f)
            with open(os.path.join(root, "smoke.json"), "w") as f:
                json.dump(smoke(root), f)


if __name__ == "__main__":
    args = [a for a in sys.argv[2:] if not a.startswith("--")]
    main(sys.argv[1], tuple(args) or tuple(PLAN), "--full" in sys.argv[2:])
