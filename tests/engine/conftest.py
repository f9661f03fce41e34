import pytest
import torch

from inhouse.config import ModelArgs, RopeScaling
from inhouse.model.transformer import Transformer
from inhouse.tokenizer import llama3_tokenizer


def make_tiny_llama(seed: int = 0, std: float = 0.2) -> Transformer:
    """A 2-layer Llama 3.1-shaped model (GQA, llama3 RoPE scaling) on the real 128,256-id vocabulary."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, hidden_dim=128,
                     rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64), max_seq_len=256)
    torch.manual_seed(seed)
    m = Transformer(args)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, std)
    return m.eval()


@pytest.fixture(scope="session")
def tok():
    return llama3_tokenizer()


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_llama()
