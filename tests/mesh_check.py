"""The sharded runs of tests/test_mesh.py, in one process with 8 forced CPU devices.

  python -m tests.mesh_check OUT_DIR [--full]

For each family (llava, instructblip, llava_next) a tiny random checkpoint whose head, key/value
head, MLP and vocabulary counts divide 8 is written to OUT_DIR/<family>, then loaded on one
device and on (data, model) meshes; each run writes OUT_DIR/<family>_<d>x<m>.npz (one device:
_ref) with the forward logits, the baseline answers, the maps, boxes and crop answers of its
methods (high-resolution tiles included) and the layouts seen. OUT_DIR/refusals.json holds the
one-line errors of meshes that must be refused, OUT_DIR/smoke.json what `eval.run
--mesh_shape=data:2,model:4` wrote. The test compares the files.

Every pass compiles anew per mesh (about a second of CPU each for these sizes), so the test
runs PLAN: the forward logits on all four meshes for every family, and each method on one
mesh that splits the params; `--full` runs every method of every family on every mesh.
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
ANSWERS = "answers"  # in a plan: the baseline and crop answers too (greedy decoding)
# {family: {mesh: what runs there}}; every run gives the logits. LLaVA's answers on (1, 8)
# take the shared-prompt cache (its batches are not split), the other families' the
# separate passes with batches split over data; (8, 1) is data parallelism alone, which
# tests/test_eval_run.py runs end to end on 8 devices as well.
PLAN = {
    "llava": {(8, 1): (), (4, 2): ("grad_att",), (2, 4): ("pure_grad",),
              (1, 8): (ANSWERS, "rel_att", "rel_att_high")},
    "instructblip": {(2, 4): (ANSWERS, "grad_att")},
    "llava_next": {(4, 2): (ANSWERS, "pure_grad")},
}  # fmt: skip
FULL_PLAN = {f: dict.fromkeys(MESHES, (ANSWERS, *METHODS)) for f in PLAN}
BATCH = 8  # questions per call: a multiple of every data axis
MAX_NEW = 3
TILE = 40  # high-res tile side: the 60-80 px test images split into 2 x 2 tiles
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


MAKERS = {"llava": make_llava, "instructblip": make_instructblip, "llava_next": make_llava_next}


def images() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    sizes = [(80, 60), (60, 80), (70, 70)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)) for w, h in sizes]


def logits(model, mesh) -> np.ndarray:
    """Forward logits of the three questions' prompts (one image each), float32[3, S, V]."""
    from vicrop_jax.families import family_of
    from vicrop_jax.loading import forward
    from vicrop_jax.processing import encode

    fam = family_of(model)
    enc = encode(model.processor, [fam.prompt(q) for q in QUESTIONS], images(), 8)
    kw = {k: v for k, v in enc.items() if k.startswith("qformer_") or k == "image_sizes"}
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        out = forward(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"], **kw)
    return np.asarray(out.logits)


def run(path: str, mesh, methods=(ANSWERS, *METHODS)) -> dict:
    """The results a mesh must reproduce, as arrays, plus the layouts seen: the logits, and
    with ANSWERS among `methods` the baseline answers and each method's map, box and crop
    answer (ViCrop end to end), else each method's maps and boxes."""
    from eval.engine import Engine
    from vicrop_jax.bbox import select_bboxes
    from vicrop_jax.loading import load_model
    from vicrop_jax.pipeline import answer_batch

    answers = ANSWERS in methods

    model = load_model(path, mesh=mesh)
    out = {"logits": logits(model, mesh)}
    if mesh is not None:
        q = model.params["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
        out["q_proj_spec"] = np.array(str(q.sharding.spec))
        out["q_proj_shard"] = np.array(q.addressable_shards[0].data.shape)
    methods = [m for m in methods if m != ANSWERS]
    if not methods:
        return out
    engine = Engine(model, batch_size=BATCH, max_new_tokens=MAX_NEW, mesh=mesh)
    ex = engine.executor
    if not answers:  # maps and boxes only (no greedy decoding to compile)
        for m in methods:
            maps = engine.maps(images(), list(QUESTIONS), m)
            boxes = select_bboxes(maps, np.array([im.size for im in images()]), ex.base_size)
            out.update({f"{m}/map{i}": a for i, a in enumerate(maps)})
            out[f"{m}/box"] = np.asarray(boxes)
        return out
    baseline, results = answer_batch(ex, images(), list(QUESTIONS), methods,
                                     high_res_threshold=TILE)  # fmt: skip
    out["answers"] = np.array(baseline)
    for m, res in results.items():
        for i, a in enumerate(res.maps):  # *_high maps differ in shape per image
            out[f"{m}/map{i}"] = a
        out[f"{m}/box"] = np.array(res.boxes)
        out[f"{m}/crop_answer"] = np.array(res.crop_answers)
    out["shared_prefix"] = np.array(ex.shares_prefix(len(QUESTIONS)))
    if mesh is not None and out["shared_prefix"]:  # the baseline's pass again: compiled
        state = ex.start(images(), list(QUESTIONS), with_map="rel_att" in methods)
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


def main(root: str, full: bool = False) -> None:
    from vicrop_jax.sharding import make_mesh

    assert len(jax.devices()) == 8, jax.devices()
    for family, plan in (FULL_PLAN if full else PLAN).items():
        path = MAKERS[family](os.path.join(root, family))
        wanted = tuple(m for m in (ANSWERS, *METHODS) if any(m in ms for ms in plan.values()))
        np.savez(os.path.join(root, f"{family}_ref.npz"), **run(path, None, wanted))
        for (d, m), methods in plan.items():
            res = run(path, make_mesh((d, m)), methods)
            np.savez(os.path.join(root, f"{family}_{d}x{m}.npz"), **res)
    with open(os.path.join(root, "refusals.json"), "w") as f:
        json.dump(refusals(root), f)
    with open(os.path.join(root, "smoke.json"), "w") as f:
        json.dump(smoke(root), f)


if __name__ == "__main__":
    main(sys.argv[1], "--full" in sys.argv[2:])
