"""ppl_vae.protocol: how the pipeline asks any guide (tables, families, held-out answer)."""
from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from conftest import (USER_D, USER_L, USER_N, FullCovarianceGuide, MyEncoderGuide,
                      TableWithoutRows, my_function_guide, user_model, user_split)
from ppl_vae import evaluate, families, guides, local_fit, nets, protocol
from ppl_vae.batching import Batch
from ppl_vae.model import data_plate

N, D, L = USER_N, USER_D, USER_L


def test_the_pipeline_asks_the_guide():
    model = user_model()
    table = guides.LocalNormal(N, L)
    encoder = guides.AmortizedNormal(nets.Encoder(D, (16,), L))
    assert protocol.local_parameters(table) == [table.params]
    assert protocol.local_parameters(encoder) == [] == protocol.local_parameters(my_function_guide)
    assert protocol.compilable(table) and protocol.compilable(encoder)  # a table gives its rows
    assert not protocol.compilable(TableWithoutRows(table))  # a table that cannot: not compiled
    x = user_split().x[:10]
    assert local_fit.held_out(encoder, model, x).guide is encoder
    held = local_fit.held_out(table, model, x, max_steps=5)
    assert held.guide is not table and held.steps == 5 and len(held.guide.params) == 10
    assert protocol.family(MyEncoderGuide(), Batch(x, torch.arange(10), 10)) == "diagonal normal"
    # q*'s family (families.py), as the guide states it or a probe finds it
    assert protocol.local_family(MyEncoderGuide(), Batch(x, torch.arange(10), 10)).name == "diagonal"
    assert protocol.local_family(encoder).name == protocol.local_family(table).name == "diagonal"


def test_each_guide_states_its_per_datapoint_family():
    enc = nets.Encoder(3, (8,), 2)
    assert protocol.local_family(guides.AmortizedNormal(enc)) is families.DIAGONAL
    assert protocol.local_family(guides.LocalNormal(4, 2)) is families.DIAGONAL
    assert protocol.local_family(guides.AmortizedIAF(enc)).name == "flow"  # a per-row flow
    assert protocol.local_family(guides.LocalTable(4, 2, "lowrank:1")).name == "lowrank:1"
    assert protocol.family(guides.LocalTable(4, 2, "full")) == "full-covariance normal"
    x = torch.randn(2, 3)
    probe = evaluate.Batch(x, torch.arange(2), 2)
    assert protocol.local_family(FullCovarianceGuide(3, 2), probe) is families.FULL  # declared
    assert protocol.local_family(_undeclared_full_guide, probe) is families.FULL  # probed
    assert protocol.family(_undeclared_full_guide, probe) == "full-covariance normal"


def _undeclared_full_guide(batch):
    loc = torch.zeros(len(batch.x), 2)
    with data_plate(batch):
        pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=torch.eye(2).expand(
            len(batch.x), 2, 2)))
