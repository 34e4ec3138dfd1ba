"""Flat-chunk gradients (dtokd.balancing.flat) against float64 references built tensor by tensor."""

import pytest
import torch

from dtokd import make_balancer
from dtokd.balancing import flat
from dtokd.balancing.flat import ChunkLayout
from dtokd.profiling import ComputeOpCounter


def tensors(shapes, dtypes=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtypes = dtypes or [torch.float32] * len(shapes)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for shape, dtype in zip(shapes, dtypes)]


SHAPES = [(4, 3), (3,), (2, 2, 2), (7,), (1,), (5, 1)]


def test_layout_groups_by_kind_and_size():
    like = tensors(SHAPES, [torch.float32, torch.float32, torch.float64, torch.float64, torch.float32, torch.float32])
    assert ChunkLayout.of(like).groups == ((0, 1), (2, 3), (4, 5))
    assert ChunkLayout.of(like, max_numel=14).groups == ((0,), (1,), (2,), (3,), (4, 5))  # 12 + 3 > 14; 8 + 7 > 14
    assert ChunkLayout.of(like, max_numel=5).groups == tuple((k,) for k in range(6))  # too large: alone
    with pytest.raises(ValueError, match="max_numel"):
        ChunkLayout.of(like, max_numel=0)


@pytest.mark.parametrize("max_numel", [1, 10, 1000])
def test_flatten_and_views_round_trip_and_release(max_numel):
    row = tensors(SHAPES)
    original = [t.clone() for t in row]
    layout = ChunkLayout.of(row, max_numel)
    chunks = layout.flatten(row)
    assert row == [None] * len(SHAPES)
    assert len(chunks) == len(layout.groups)
    for view, t in zip(layout.views(chunks), original):
        assert view.shape == t.shape
        torch.testing.assert_close(view, t, rtol=0, atol=0)


@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("max_numel", [1, 9, 1000])
def test_gram_and_combine_match_float64_reference(m, max_numel):
    rows = [tensors(SHAPES, seed=i) for i in range(m)]
    reference = torch.stack([torch.cat([t.double().reshape(-1) for t in row]) for row in rows])
    layout = ChunkLayout.of(rows[0], max_numel)
    chunks = [layout.flatten(list(row)) for row in rows]
    gram = flat.gram(chunks)
    assert gram.dtype == torch.float64 and gram.shape == (m, m)
    assert torch.equal(gram, gram.T)
    torch.testing.assert_close(gram, reference @ reference.T, rtol=1e-6, atol=1e-6)
    coefficients = torch.randn(m, dtype=torch.float64).tolist()
    combined = torch.cat([v.reshape(-1) for v in layout.views(flat.combine(chunks, coefficients))])
    torch.testing.assert_close(
        combined.double(), torch.tensor(coefficients, dtype=torch.float64) @ reference, rtol=1e-6, atol=1e-6
    )


def test_half_precision_chunks_are_dotted_in_float32():
    rows = [tensors([(300,), (50,)], [torch.bfloat16, torch.float32], seed=i) for i in range(2)]
    reference = torch.stack([torch.cat([t.double().reshape(-1) for t in row]) for row in rows])
    layout = ChunkLayout.of(rows[0])
    assert layout.groups == ((0,), (1,))
    gram = flat.gram([layout.flatten(list(row)) for row in rows])
    # a bf16 dot product returns bf16 (8 bits of mantissa); upcast, the sums keep float32 accuracy
    torch.testing.assert_close(gram, reference @ reference.T, rtol=1e-5, atol=1e-4)


def test_accumulate_grads_adds_or_sets():
    params = [torch.zeros(3, requires_grad=True), torch.zeros(2, 2, requires_grad=True)]
    params[0].grad = torch.ones(3)
    updates = [torch.full((3,), 2.0), torch.full((2, 2), 5.0)]
    flat.accumulate_grads(params, updates)
    torch.testing.assert_close(params[0].grad, torch.full((3,), 3.0))
    torch.testing.assert_close(params[1].grad, torch.full((2, 2), 5.0))


@pytest.mark.parametrize("m", [2, 3])
def test_operations_do_not_grow_with_the_number_of_tensors(m):
    """The point of the chunks: the Gram, the combination and the write-back cost a number of
    operations (kernel launches on a GPU) set by m and the number of chunks, not of tensors."""
    counts = []
    for n_tensors in (10, 200):
        shapes = [(3, 4)] * n_tensors
        rows = [tensors(shapes, seed=i) for i in range(m)]
        params = [torch.zeros(s, requires_grad=True) for s in shapes]
        for p in params:
            p.grad = torch.zeros_like(p)
        layout = ChunkLayout.of(rows[0])
        with ComputeOpCounter() as ops:
            chunks = [layout.flatten(list(row)) for row in rows]
            flat.gram(chunks)
            flat.accumulate_grads(params, layout.views(flat.combine(chunks, [1.0] * m)))
        counts.append(ops.count)
    assert counts[0] == counts[1] < 20, counts


def test_exact_engine_with_many_chunks_equals_one_chunk(monkeypatch):
    def run():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
        x = torch.randn(8, 6, dtype=torch.float64)
        out = net(x)
        info = make_balancer("dto", net.parameters()).backward({"a": out.pow(2).mean(), "b": (out - 1).abs().mean()})
        return info, [p.grad.clone() for p in net.parameters()]

    one_info, one_grads = run()
    monkeypatch.setattr(flat, "CHUNK_NUMEL", 4)  # every tensor its own chunk (or several)
    many_info, many_grads = run()
    torch.testing.assert_close(many_info.gram, one_info.gram, rtol=1e-12, atol=1e-14)
    for a, b in zip(many_grads, one_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_exact_engine_with_channels_last_and_empty_parameters_matches_plain_backward():
    """Non-contiguous (channels_last) gradients are flattened in logical order and written back
    with the parameters' shapes; an empty parameter is carried along."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 2)).double()
    net = net.to(memory_format=torch.channels_last)
    empty = torch.nn.Parameter(torch.zeros(0, dtype=torch.float64))
    params = [*net.parameters(), empty]
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64).to(memory_format=torch.channels_last)

    def losses():
        out = net(x)
        return {"a": out.pow(2).mean() + empty.sum(), "b": (out - 1).abs().mean()}

    info = make_balancer("fixed", params, weights=[0.3, 0.7]).backward(losses(), diagnose=True)
    written = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    values = losses()
    (0.3 * values["a"] + 0.7 * values["b"]).backward()
    assert info.gram is not None
    for got, want in zip(written, [p.grad for p in params]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
