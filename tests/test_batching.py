"""ppl_vae.batching: minibatches (cover, drop_last, seeded order) and torchrun's shards."""
from __future__ import annotations

import math

import pytest
import torch

from ppl_vae import batching, data
from ppl_vae.errors import UserError

from conftest import random_split


@pytest.mark.parametrize("n,batch_size", [(103, 10), (100, 10), (7, 7), (5, 8)])
def test_minibatches_cover_split_exactly_once(n, batch_size):
    split = random_split(n)
    batches = list(batching.minibatches(split, batch_size, data.Binarize("none"),
                                    torch.Generator().manual_seed(1)))
    assert len(batches) == batching.num_batches(n, batch_size) == math.ceil(n / batch_size)
    idx = torch.cat([b.idx for b in batches])
    assert sorted(idx.tolist()) == list(range(n))
    for b in batches:
        assert b.num_data == n
        assert torch.equal(b.x, split.x[b.idx])  # binarize none: the pixels themselves
        assert len(b.idx) <= batch_size
    assert all(len(b.idx) == batch_size for b in batches[:-1])


def test_minibatches_drop_last():
    split = random_split(103)
    batches = list(batching.minibatches(split, 10, data.Binarize("none"),
                                    torch.Generator().manual_seed(0), drop_last=True))
    assert len(batches) == batching.num_batches(103, 10, drop_last=True) == 10
    idx = torch.cat([b.idx for b in batches])
    assert len(set(idx.tolist())) == 100


def test_minibatch_order_is_seeded():
    split = random_split(50)

    def order(seed, shuffle=True):
        g = torch.Generator().manual_seed(seed)
        return torch.cat([b.idx for b in batching.minibatches(split, 8, data.Binarize("none"), g,
                                                          shuffle=shuffle)])

    assert torch.equal(order(3), order(3))
    assert not torch.equal(order(3), order(4))
    assert torch.equal(order(3, shuffle=False), torch.arange(50))
    # the global RNG does not influence a seeded order
    torch.manual_seed(123)
    a = order(5)
    torch.manual_seed(456)
    assert torch.equal(a, order(5))


def test_shards_of_one_process_are_minibatches_and_shards_partition_the_rows():
    x = torch.rand(103, 4)
    split = data.Split(x, torch.zeros(103, dtype=torch.long))
    one = batching.Shards(103, 1, 10).batches(split, [data.Binarize("none")], 5, [0])
    plain = batching.minibatches(split, 10, data.Binarize("none"), torch.Generator().manual_seed(5))
    assert [b.idx.tolist() for b in one] == [b.idx.tolist() for b in plain]
    shards = batching.Shards(103, 2, 10)  # 52 + 51 rows: 6 steps, the last one short
    assert shards.steps == 6
    per_rank = [[b.idx for b in shards.batches(split, [data.Binarize("none")] * 2, 7, [r])]
                for r in range(2)]
    for r, batches in enumerate(per_rank):
        rows = torch.cat(batches)
        assert torch.equal(rows.sort().values, shards.rows(r))  # its own rows, each once
        assert [len(b) for b in batches] == [10] * 5 + [len(shards.rows(r)) - 50]
    union = [b.idx for b in shards.batches(split, [data.Binarize("none")] * 2, 7, [0, 1])]
    assert [u.tolist() for u in union] == [torch.cat([a, b]).tolist()
                                          for a, b in zip(*per_rank)]
    with pytest.raises(UserError, match="fewer than its batch"):
        batching.Shards(30, 2, 16)
