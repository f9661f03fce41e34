"""Tiny models for the fine-tuning tests (imported by path: tests have no packages)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "weights"))

from helpers import TINY, random_state_dict  # noqa: E402

from inhouse.config import ModelArgs  # noqa: E402
from inhouse.model.transformer import Transformer  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data")

# Tiny architecture with SmolLM2's vocabulary, so real chat data can be trained on it quickly.
TINY_SMOL = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, hidden_dim=192,
                      norm_eps=1e-5, rope_theta=10000.0, max_seq_len=2048, tie_embeddings=True)


def build(args: ModelArgs, seed: int = 0, std: float = 0.2) -> Transformer:
    """A fp32 Transformer with helpers.random_state_dict weights."""
    model = Transformer(args)
    sd = random_state_dict(args, seed=seed, std=std)
    if args.tie_embeddings:
        sd.pop("output.weight")
    model.load_state_dict(sd, strict=False)
    model.tie_weights()
    return model.eval()
