"""vicrop-jax: training-free visual cropping (ViCrop) for multimodal LLMs in JAX/Flax."""

__version__ = "0.1.0"

from vicrop_jax.loading import Model, forward, load_model  # noqa: E402

__all__ = ["Model", "forward", "load_model", "__version__"]
