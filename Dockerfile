# megatron-longctx on NVIDIA's PyTorch image (CUDA, cuDNN, NCCL, PyTorch, Transformer Engine and
# apex prebuilt and tested together; FP8 and FP8 attention need TE's CUDA build, which PyPI does
# not provide for every torch).
#
#   docker build -t megatron-longctx .
#   docker run --gpus all --rm megatron-longctx                # prints pretrain_longctx.py --help
#   docker run --gpus all --rm -it megatron-longctx bash
#
# On SLURM with pyxis/enroot: `enroot import dockerd://megatron-longctx`, then
#   CONTAINER_IMAGE=$PWD/megatron-longctx.sqsh sbatch examples/train_128k.sh
# (the script adds --container-image/--container-mounts to srun; see docs/slurm.md).
#
# Base: 25.09 is the NGC PyTorch release Megatron-LM pins as its LTS image (Python 3.12,
# megatron-core 0.16.1 has cp312 wheels). Pinned by tag, never `latest`: TE, cuDNN and NCCL
# versions change between releases and the FP8 attention path depends on all three.
FROM nvcr.io/nvidia/pytorch:25.09-py3

# (hadolint reads the "TOKEN" in TOKENIZERS_PARALLELISM as a secret)
# hadolint ignore=DL3064
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TOKENIZERS_PARALLELISM=false
WORKDIR /workspace/megatron-longctx

# The image's global PIP_CONSTRAINT pins nearly every preinstalled package and clashes with
# megatron-core's requirements; we replace it with a constraint on exactly the packages that
# must never be rebuilt or replaced by PyPI wheels (the image's CUDA builds of torch, TE, apex,
# flash-attn). pip then fails instead of silently reinstalling torch.
RUN python -c "import importlib.metadata as m; \
names = {(d.metadata['Name'] or '').lower().replace('_', '-'): d.version for d in m.distributions()}; \
keep = ('torch', 'transformer-engine', 'transformer-engine-torch', 'apex', 'flash-attn'); \
print('\n'.join(f'{n}=={names[n]}' for n in keep if n in names))" > /opt/longctx-constraints.txt \
 && cat /opt/longctx-constraints.txt \
 && grep -q '^torch==' /opt/longctx-constraints.txt
ENV PIP_CONSTRAINT=/opt/longctx-constraints.txt

# Dependencies and the csrc/ extension first: this layer is rebuilt only when the package changes.
# --no-build-isolation compiles csrc/ with the image's setuptools and a pinned pybind11.
COPY setup.py pyproject.toml README.md ./
COPY csrc/ csrc/
COPY megatron_longctx/ megatron_longctx/
RUN pip install pybind11==2.13.6 \
 && pip install --no-build-isolation -e .[wandb] \
 && python -c "import megatron_longctx.data.native as n; assert n.BACKEND == 'csrc', n.BACKEND"

# The rest of the repository (tools, examples, entry point, docs, tests).
COPY . .
RUN python -c "import megatron.core, transformer_engine.pytorch, megatron_longctx; print('ok')"

# The image's own ENTRYPOINT (/opt/nvidia/nvidia_entrypoint.sh: banner, then exec) is kept;
# without arguments the container prints the trainer's flags.
CMD ["python", "pretrain_longctx.py", "--help"]
