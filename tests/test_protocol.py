"""ppl_vae.protocol: how the pipeline asks any guide (tables, families, held-out answer)."""
from __future__ import annotations

import pyro
import pytest
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
    function = protocol.as_guide(my_function_guide)
    assert table.local_parameters() == [table.params]
    assert encoder.local_parameters() == [] == function.local_parameters()
    assert table.traceable() and encoder.traceable()  # a table gives its rows
    assert not protocol.as_guide(TableWithoutRows(table)).traceable()  # one that cannot
    x = user_split().x[:10]
    assert local_fit.held_out(encoder, model, x).guide is encoder
    held = local_fit.held_out(table, model, x, max_steps=5)
    assert held.guide is not table and held.steps == 5 and len(held.guide.params) == 10
    probe = Batch(x, torch.arange(10), 10)
    mine = protocol.as_guide(MyEncoderGuide())
    assert protocol.family_words(mine, probe) == "diagonal normal"
    # q*'s family (families.py), as the guide states it or a probe finds it
    assert protocol.family_of(mine, probe).name == "diagonal"
    assert protocol.family_of(encoder).name == protocol.family_of(table).name == "diagonal"


def test_as_guide_adapts_a_users_guide_once_in_place():
    """A user's module keeps its class's name, its isinstance, its own answers, its state's
    keys and its parameters; it gains the defaults of what it does not answer; adapting it
    again changes nothing; a function is wrapped, anything else refused."""
    table = guides.LocalNormal(N, L)
    user = TableWithoutRows(table)
    keys, params = list(user.state_dict()), list(user.parameters())
    adapted = protocol.as_guide(user)
    assert adapted is user and isinstance(user, TableWithoutRows)
    assert type(user).__name__ == "TableWithoutRows" and isinstance(user, protocol.Answers)
    assert list(user.state_dict()) == keys and list(user.parameters()) == params
    assert user.local_parameters() == [table.params]  # its own answer
    assert user.views() == {} and user.shard(0, 2) is user  # the defaults
    assert protocol.as_guide(user) is user and type(user) is type(adapted)
    assert type(protocol.as_guide(TableWithoutRows(table))) is type(user)  # one class each
    assert protocol.as_guide(table) is table and type(table) is guides.LocalNormal
    function = protocol.as_guide(my_function_guide)
    assert function.fn is my_function_guide and protocol.as_guide(function) is function
    with pytest.raises(TypeError, match="a guide is a Pyro program"):
        protocol.as_guide(3)


def test_each_guide_states_its_per_datapoint_family():
    enc = nets.Encoder(3, (8,), 2)
    assert protocol.family_of(guides.AmortizedNormal(enc)) is families.DIAGONAL
    assert protocol.family_of(guides.LocalNormal(4, 2)) is families.DIAGONAL
    assert protocol.family_of(guides.AmortizedIAF(enc)).name == "flow"  # a per-row flow
    assert protocol.family_of(guides.LocalTable(4, 2, "lowrank:1")).name == "lowrank:1"
    assert protocol.family_words(guides.LocalTable(4, 2, "full")) == "full-covariance normal"
    x = torch.randn(2, 3)
    probe = evaluate.Batch(x, torch.arange(2), 2)
    declared = protocol.as_guide(FullCovarianceGuide(3, 2))
    assert protocol.family_of(declared, probe) is families.FULL  # declared
    undeclared = protocol.as_guide(_undeclared_full_guide)
    assert protocol.family_of(undeclared, probe) is families.FULL  # probed
    assert protocol.family_words(undeclared, probe) == "full-covariance normal"
    assert protocol.family_of(undeclared) is None  # no rows to probe: unstated


def _undeclared_full_guide(batch):
    loc = torch.zeros(len(batch.x), 2)
    with data_plate(batch):
        pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=torch.eye(2).expand(
            len(batch.x), 2, 2)))
