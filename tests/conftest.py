import os

import jax
import pytest

# Parity tests compare float32 numbers: pin full-precision matmuls.
jax.config.update("jax_default_matmul_precision", "highest")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A tiny random LLaVA checkpoint + processor, and the HF torch model it was saved from."""
    from tests.hf_reference import make_tiny_llava

    d = str(tmp_path_factory.mktemp("tiny_llava"))
    hf = make_tiny_llava(d)
    hf.set_attn_implementation("eager")
    return d, hf


@pytest.fixture(scope="session")
def tiny_llava(tiny_llava_dir):
    import vicrop_jax

    d, hf = tiny_llava_dir
    return vicrop_jax.load_model(d), hf


@pytest.fixture(scope="session")
def tiny_instructblip_dir(tmp_path_factory):
    """A tiny random InstructBLIP (Vicuna) checkpoint + processor, and its HF torch model."""
    from tests.hf_reference import make_tiny_instructblip

    d = str(tmp_path_factory.mktemp("tiny_instructblip"))
    hf = make_tiny_instructblip(d)
    hf.set_attn_implementation("eager")
    return d, hf


@pytest.fixture(scope="session")
def tiny_instructblip(tiny_instructblip_dir):
    import vicrop_jax

    d, hf = tiny_instructblip_dir
    return vicrop_jax.load_model(d), hf


@pytest.fixture(scope="session")
def tiny_llava_next(tmp_path_factory):
    """A tiny random LLaVA-NeXT checkpoint loaded through vicrop_jax, and its HF torch model."""
    import vicrop_jax
    from tests.hf_reference import make_tiny_llava_next

    d = str(tmp_path_factory.mktemp("tiny_llava_next"))
    hf = make_tiny_llava_next(d)
    hf.set_attn_implementation("eager")
    return vicrop_jax.load_model(d), hf
