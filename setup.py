"""unif2ace_jax: a TPU-first JAX/Flax implementation of UniF^2ace (arXiv 2503.08120)."""

from setuptools import find_packages, setup

# Versions are pinned to the set this project is tested with; see README "Set-up".
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "ml_collections==1.1.0",
    "absl-py>=2.1",
    "numpy>=1.26",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "grain==0.2.18",
    "sentencepiece==0.2.3",
    "pillow>=10",
    "tqdm>=4.66",
    "rich>=13",
    "pyarrow>=14",
    "safetensors>=0.4",  # Show-o weights (unif2ace_jax.convert)
    "tokenizers>=0.19",  # GPT-2 / Phi BPE text tokenizer (Show-o)
]

EXTRAS_REQUIRE = {
    # import-linter: `lint-imports` checks the layering in .importlinter (run by the test job).
    "test": ["pytest>=8", "pytest-xdist>=3.5", "import-linter>=2.17,<3"],
    # Only for ahead-of-time TPU compiles on a CPU host (unif2ace_jax.aot).
    "tpu": ["jax[tpu]==0.10.2"],
    # Weight converters; the CPU wheel of torch 2.13.0 is what the tests use.
    "convert": ["torch==2.13.0", "transformers>=4.45"],
}

setup(
    name="unif2ace_jax",
    version="0.1.0",
    description="UniF2ace in JAX/Flax: unified fine-grained face understanding and generation.",
    packages=find_packages(include=["unif2ace_jax", "unif2ace_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
