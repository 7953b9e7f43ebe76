import atexit
import os
import shutil
import tempfile

import jax
import pytest

# Tiny models: the suite's time goes into XLA compiling, not running, its programs. The fast
# compile (as tests/mesh_check.py uses) for this process and the subprocesses that inherit its
# environment; set before the first computation starts the CPU backend, which reads the flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

# Parity tests compare float32 numbers: pin full-precision matmuls.
jax.config.update("jax_default_matmul_precision", "highest")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Many tests compile the same tiny programs (one model, several test files, two xdist workers):
# one XLA compilation cache for the whole run, made empty by the first process (the xdist
# controller, whose workers inherit the variable) and removed by it at exit. Subprocesses that
# tests start (benches, forced-device checks) do not read it: every run compiles afresh.
_CACHE_VAR = "VICROP_TEST_XLA_CACHE"
if _CACHE_VAR not in os.environ:
    os.environ[_CACHE_VAR] = tempfile.mkdtemp(prefix="vicrop_xla_cache_")
    atexit.register(shutil.rmtree, os.environ[_CACHE_VAR], ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VAR])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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


@pytest.fixture
def remat_counts(monkeypatch):
    """spy(owner, name) -> a list that gets, on each call of the jitted `owner.name`, the
    number of rematerialised (recomputed-in-backward) layers in the program it traces."""

    def spy(owner, name: str) -> list[int]:
        real, counts = getattr(owner, name), []

        def traced(*args, **kwargs):
            counts.append(str(real.trace(*args, **kwargs).jaxpr).count("remat"))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, traced)
        return counts

    return spy
