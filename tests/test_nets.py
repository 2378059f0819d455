"""Convolutional encoder and decoder: shapes of any image, particle dimensions, every guide
and likelihood, and a 1-epoch smoke run on Fashion-MNIST- and CIFAR-shaped data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ppl_vae import nets, objectives
from ppl_vae.batching import Batch
from ppl_vae.build import build_guide, build_model
from ppl_vae.config import Config
from ppl_vae.run import fit_run

SHAPES = [(1, 28, 28), (3, 32, 32), (1, 20, 28), (3, 17, 33), (1, 5, 9)]


@pytest.mark.parametrize("shape", SHAPES)
def test_conv_nets_map_any_image_shape_and_keep_particle_dims(shape):
    d = int(np.prod(shape))
    enc, dec = nets.ConvEncoder(shape, [32], 6), nets.ConvDecoder(6, [32], shape)
    loc, scale = enc(torch.rand(4, d))
    assert loc.shape == scale.shape == (4, 6) and (scale > 0).all()
    out = dec(torch.randn(3, 4, 6))  # [K, B, L] -> [K, B, D]
    assert out.shape == (3, 4, d)
    # particles are independent: decoding one slice alone gives the same output
    z = torch.randn(3, 4, 6)
    assert torch.allclose(dec(z)[1], dec(z[1]), atol=1e-6)


def test_conv_encoder_sees_the_image_layout():
    """The conv encoder reads pixels as an image: a shifted image is not a permuted vector."""
    shape = (1, 12, 12)
    enc = nets.ConvEncoder(shape, [16], 2)
    assert [type(m).__name__ for m in enc.conv][:1] == ["Conv2d"]
    x = torch.zeros(1, 1, 12, 12)
    x[..., 2:5, 2:5] = 1
    loc_a, _ = enc(x.flatten(1))
    loc_b, _ = enc(torch.roll(x, 1, dims=-1).flatten(1))
    assert not torch.allclose(loc_a, loc_b)


def test_conv_nets_take_the_configured_activation():
    """--activation reaches the conv nets (it was recorded but ReLU ran); relu is as before."""
    config = Config(net="conv", latent_dim=3, hidden=(16,), activation="elu")
    model = build_model(config, 144, (1, 12, 12))
    guide = build_guide(config, 144, 10, model=model)
    for net in (model.decoder, guide.encoder):
        kinds = {type(m).__name__ for m in net.modules()}
        assert "ELU" in kinds and "ReLU" not in kinds
    relu = build_model(Config(net="conv", latent_dim=3, hidden=(16,)), 144, (1, 12, 12))
    # the default builds the layers the conv decoder had before it took an activation
    assert [type(m).__name__ for m in relu.decoder.head] == ["Linear", "ReLU", "Linear"]
    assert [type(m).__name__ for m in relu.decoder.deconv] == ["ReLU", "ConvTranspose2d"]


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli", "normal",
                                        "normal_shared"])
@pytest.mark.parametrize("guide", ["amortized", "meanfield", "iaf"])
def test_conv_model_with_every_guide_and_likelihood_has_finite_gradients(guide, likelihood):
    shape = (3, 16, 12)
    d = int(np.prod(shape))
    config = Config(net="conv", guide=guide, likelihood=likelihood, latent_dim=3, hidden=(16,))
    model = build_model(config, d, shape)
    assert isinstance(model.decoder, nets.ConvDecoder)
    x = torch.bernoulli(torch.full((5, d), 0.3))
    q = build_guide(config, d, 5, shape=shape)
    if guide != "meanfield":
        assert isinstance(q.encoder, nets.ConvEncoder)
    lw = objectives.log_weights(model, q, Batch(x, torch.arange(5), 5), 4).total  # [K, B]
    assert lw.shape == (4, 5) and torch.isfinite(lw).all()
    lw.mean().backward()
    grads = [p.grad for p in model.decoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("guide", ["amortized", "meanfield", "iaf"])
def test_conv_smoke_one_epoch_on_random_images(tmp_path, shape, guide):
    """Fashion-MNIST-shaped and CIFAR-shaped random images, 240 rows, 1 epoch, each guide."""
    path = tmp_path / "d.npz"
    np.savez(path, x=np.random.default_rng(0).integers(0, 256, (240, *shape), dtype=np.uint8))
    config = Config(dataset=str(path), net="conv", guide=guide, epochs=1, batch_size=48,
                    latent_dim=4, hidden=(32,), valid_size=40, device="cpu")
    before = build_model(config, int(np.prod(shape)), shape).decoder.state_dict()
    trained = fit_run(config, progress=False, log=lambda s: None)
    assert trained.splits.shape == shape
    assert isinstance(trained.model.decoder, nets.ConvDecoder)
    assert trained.model.decoder.shape == shape
    (m,) = trained.history
    assert np.isfinite(m.train_elbo) and np.isfinite(m.valid_elbo) and m.steps == 4
    after = trained.model.decoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained


def test_net_is_validated():
    from ppl_vae.errors import UserError
    with pytest.raises(UserError, match="unknown network 'resnet' for net \\(--net\\); choose one of mlp, conv"):
        Config(net="resnet").validate()
