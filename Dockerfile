# megatron-tw for GPUs: NVIDIA's NGC PyTorch image brings CUDA, cuDNN, NCCL, PyTorch, Transformer
# Engine and apex, built and tested together; this file adds megatron-core and the project.
#
#   docker build -t megatron-tw:gpu .
#   docker run --rm --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       megatron-tw:gpu bash benchmarks/gpu_check.sh
#
# See docs/gpu.md (GPU check, launch scripts, FP8 recipes).
#
# Base image: the NGC release of August 2026, current when megatron-core 0.19.2 came out
# (Megatron-LM builds each release on the previous month's NGC image); Ubuntu 24.04, Python 3.12.
# Another release: docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:YY.MM-py3
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.08-py3
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# PIP_CONSTRAINT: NGC pins its whole Python environment through /etc/pip/constraint.txt, which
# also blocks harmless upgrades megatron-core's dependencies ask for; it is replaced below by a
# narrower constraints file that protects exactly the GPU stack.
ENV PIP_CONSTRAINT="" \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1

WORKDIR /workspace/megatron-tw

# The torch pin conflict: pyproject.toml pins torch==2.13.0 (the PyPI build used on CPU machines
# and in CI), while this image ships NVIDIA's own torch build (e.g. 2.x.0a0+<sha>.nv26.8) that
# Transformer Engine, apex and flash-attention are compiled against. Reinstalling torch from PyPI
# would break them. So:
#   1. the image's GPU stack (torch, triton, Transformer Engine, apex, flash-attention, NVIDIA
#      libraries, numpy) is frozen into a constraints file at its installed versions;
#   2. megatron-core and the small dependencies install under it: pip stops with a conflict
#      rather than replace any of them;
#   3. the project itself installs with --no-deps, so its torch==2.13.0 pin is never applied;
#   4. the build fails if torch's version changed anyway.
# Versions: those the project's tests pass with on megatron-core 0.19.2.
RUN python -c "import torch; print(torch.__version__)" > /tmp/torch-version.txt \
    && pip list --format=freeze \
       | grep -iE '^(torch|torchvision|torchaudio|triton|pytorch[-_]triton|transformer[-_]engine[^=]*|apex|flash[-_]attn[^=]*|nvidia-[^=]+|cupy[^=]*|numpy)==' \
       > /tmp/gpu-stack-constraints.txt \
    && cat /tmp/gpu-stack-constraints.txt \
    && pip install --constraint /tmp/gpu-stack-constraints.txt \
        megatron-core==0.19.2 \
        psutil==7.2.2 \
        tensorboard==2.21.0 \
        sentencepiece==0.2.3 \
        tqdm==4.70.1 \
        transformers==5.24.0 \
        safetensors==0.8.0 \
        tokenizers==0.23.3 \
        pytest==9.2.0 \
        matplotlib \
        wonderwords==3.0.1 \
        wandb \
    && python -c "import torch; print(torch.__version__)" | diff - /tmp/torch-version.txt

COPY pyproject.toml README.md ./
COPY megatron_tw ./megatron_tw
COPY pretrain_tw.py ./
COPY tools ./tools
COPY examples ./examples
COPY benchmarks ./benchmarks
COPY tests ./tests

RUN pip install --no-deps --no-build-isolation --editable . \
    && python -c "import torch, megatron.core, megatron_tw; print('torch', torch.__version__, 'megatron-core', megatron.core.__version__)" \
    && python -c "import torch; print(torch.__version__)" | diff - /tmp/torch-version.txt

CMD ["bash"]
