"""Weights moved into one huge-page memory block (inhouse/model/arena.py): same values, same objects, ties kept."""

import sys

import pytest
import torch

from inhouse.model.arena import huge_pages_available, move_to_huge_pages
from inhouse.model.quant import quantize_model

make_tiny_llama = sys.modules["_inhouse_tests_tiny"].make_tiny_llama

pytestmark = pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages on this system")


def test_values_objects_and_ties_survive_the_move():
    model = quantize_model(make_tiny_llama(seed=0, std=0.3), "int4")
    before = {n: t.clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    objects = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.inference_mode():
        logits = model(ids)
    moved = move_to_huge_pages(model)
    assert moved >= sum(t.numel() * t.element_size() for t in before.values()) * 0.9
    after = dict(list(model.named_parameters()) + list(model.named_buffers()))
    ptrs = []
    for name, t in after.items():
        assert t is objects[name], name  # the same tensor objects, pointed at new memory
        assert torch.equal(t, before[name]), name
        ptrs.append(t.data_ptr())
    assert all(p % 64 == 0 for p in ptrs)
    assert max(ptrs) - min(ptrs) < moved + (2 << 20)  # one block
    if model.args.tie_embeddings:
        assert model.output.rows.data_ptr() == model.tok_embeddings.weight.data_ptr()
    with torch.inference_mode():
        assert torch.equal(model(ids), logits)
    assert move_to_huge_pages(model) == 0  # already there: nothing moves twice


def test_trainable_parameters_stay_where_they_are():
    model = make_tiny_llama(seed=1)
    model.layers[0].attention.wq.weight.requires_grad_(True)
    ptr = model.layers[0].attention.wq.weight.data_ptr()
    for p in model.parameters():
        if p is not model.layers[0].attention.wq.weight:
            p.requires_grad_(False)
    move_to_huge_pages(model)
    assert model.layers[0].attention.wq.weight.data_ptr() == ptr


@pytest.mark.parametrize("vocabulary", ["q4", "q8"])
def test_quantized_weights_own_their_memory(vocabulary):
    """A model loaded as a GGUF file is (4-bit matrices; a Q4_1 or Q8_0 tied vocabulary): no weight
    is a view of a larger temporary. The move replaces each tensor's data; a view's base would keep
    the old copy alive (on SmolLM2 ~60 MB of a converting start)."""
    model, _ = sys.modules["_inhouse_tests_tiny"].tiny_with_file_vocabulary(vocabulary)
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    views = [n for n, t in tensors if t._base is not None]
    assert not views, views[:5]
    for _, t in tensors:
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
