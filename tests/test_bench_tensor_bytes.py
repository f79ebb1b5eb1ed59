"""The CPU's peak-memory counter of the benchmark: it must count what the operators allocate, and only that."""

import pytest
import torch

from bench.measure import TensorBytesPeak

N = 1024  # float32 elements: 4 KiB a tensor


def test_counts_the_tensors_alive_together_at_the_peak():
    x = torch.ones(N)
    with TensorBytesPeak() as m:
        y = x * 2
        z = y + 1
        del y
        w = z * 3  # y is gone: two tensors of N alive again, never three
        assert m.live == 2 * 4 * N
    assert m.peak == 2 * 4 * N
    del z, w
    assert m.live == 0


def test_views_share_one_storage_and_views_of_given_tensors_cost_nothing():
    weight = torch.ones(N, 4)
    with TensorBytesPeak() as m:
        t = weight.t()  # a view of a tensor given to the block: allocated before it
        y = weight.sum(1)
        v = y.view(32, 32)  # the same storage as y
        assert m.live == 4 * N
        del y
        assert m.live == 4 * N  # v still holds it
        del v
    assert m.live == 0 and m.peak == 4 * N
    assert t.shape == (4, N)


def test_a_chain_frees_its_intermediates():
    x = torch.ones(N)
    with TensorBytesPeak() as m:
        s = (x * 2 + 1).exp().sum()  # x*2 and x*2+1 alive together, then one of them and exp's result
    assert m.peak == 2 * 4 * N
    assert m.live == 4 and s.item() > 0  # only the sum's one float remains


def test_the_encoder_section_reads_its_peak_on_the_cpu():
    pytest.importorskip("transformers")  # the encoder's class; not a test dependency
    from bench.encoder import TOY, main

    for row in main(["--toy", "--iters", "1"])["rows"]:
        itemsize = 4 if row["precision"].startswith("float32") else 2
        assert row["weights_mb"] * 2**20 == row["parameters"] * itemsize
        # every hidden state (the embeddings' and each layer's) is returned: at least those bytes at the peak
        tokens = (TOY["image_size"] // TOY["patch_size"]) ** 2 + 1
        hidden = (TOY["num_hidden_layers"] + 1) * tokens * TOY["hidden_size"] * itemsize
        assert hidden <= row["embed_peak_mb"] * 2**20 < 4 * hidden + row["weights_mb"] * 2**20
        assert row["peak_counted"] == "tensor bytes"
