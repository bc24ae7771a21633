"""Weights moved into 2 MB pages (hugepages.py) keep their values, and the kernels read them where they now are."""

import pytest
import torch

from specmtp import hugepages, quant
from specmtp.loader import load_model

needs_thp = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages here")


def test_large_tensors_leaves_views_shared_storage_and_small_tensors():
    m = torch.nn.Module()
    m.big = torch.nn.Parameter(torch.zeros(100_000))
    m.register_buffer("small", torch.zeros(10))
    base = torch.zeros(2, 100_000)
    m.register_buffer("view", base[1])  # a view: its storage holds more than itself
    m.register_buffer("a", torch.zeros(100_000))
    m.b = torch.nn.Parameter(m.a)  # two tensors on one storage
    assert [t is m.big for t in hugepages.large_tensors(m)] == [True]


@needs_thp
@pytest.mark.parametrize("weights", ["dense", "q8"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_adopted_weights_compute_what_they_computed(tiny_dir, monkeypatch, family, weights):
    """Every weight of a tiny model moved (the size threshold lowered), into one mapping starting on a 2 MB boundary;
    the same outputs as a model whose weights stayed put, and the layer stack's descriptor at the new addresses."""
    if weights == "q8" and not quant.available():
        pytest.skip("kernels not built")
    path = str(tiny_dir(family))
    monkeypatch.setattr(hugepages, "available", lambda: False)
    ref = load_model(path, weights=weights).model
    monkeypatch.undo()
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)
    model = load_model(path, weights=weights).model
    moved = [t for t in [*model.parameters(), *model.buffers()] if t.numel()]  # quantized layers' dense stubs: empty
    for m in model.modules():
        for qw in (getattr(m, "qweight", None), getattr(m, "head_q", None)):
            moved += hugepages.weight_tensors(qw) if qw is not None else []
    assert not hugepages.large_tensors(model)  # now views of one storage: a second adopt would move nothing
    ptrs = sorted(t.data_ptr() for t in moved)
    assert moved and ptrs[0] % hugepages.PAGE == 0
    assert ptrs[-1] - ptrs[0] < sum(t.numel() * t.element_size() for t in moved) + 64 * len(moved)  # one mapping
    if model.stack is not None:
        assert torch.equal(model.stack, quant.stack_descriptor(model.layers))
    tokens = torch.randint(0, 256, (1, 26), generator=torch.Generator().manual_seed(0))
    outs = []
    for m in (ref, model):
        cache = m.new_cache(1, 40)
        hidden = [m(tokens[:, :20], torch.arange(20)[None], cache), m(tokens[:, 20:21], torch.tensor([[20]]), cache),
                  m(tokens[:, 21:26], torch.arange(21, 26)[None], cache)]
        outs.append([m.logits(h) for h in hidden])
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))


def test_the_environment_turns_them_off(monkeypatch):
    monkeypatch.setenv("SPECMTP_HUGEPAGES", "0")
    t = torch.zeros(100_000)
    assert not hugepages.available() and hugepages.adopt([t]) == 0


def test_park_leaves_the_next_product_exact():
    if not quant.available():
        pytest.skip("kernels not built")
    x, w = torch.randn(3, 64), torch.randn(512, 64)
    before = quant.qlinear(x, w)
    quant.park()
    assert torch.equal(quant.qlinear(x, w), before)


def test_a_refused_mapping_leaves_the_tensors_where_they_are(monkeypatch):
    if not hugepages.available():
        pytest.skip("no transparent huge pages here")

    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    t = torch.arange(100_000, dtype=torch.float32)
    ptr = t.data_ptr()
    monkeypatch.setattr(hugepages.mmap, "mmap", refuse)
    assert hugepages.adopt([t]) == 0 and t.data_ptr() == ptr and t[-1].item() == 99_999
