"""The network: the Llama 3.x decoder and its KV cache."""

from inhouse.model.kv_cache import KVCache
from inhouse.model.transformer import Transformer

__all__ = ["KVCache", "Transformer"]
