"""ppl_vae: variational autoencoders as Pyro programs; amortized, semi-amortized and
mean-field (per-datapoint) inference compared.

Modules: ``data``, ``batching``, ``nets``, ``likelihoods``, ``priors``, ``model``, ``guides``
(and the guide protocol), ``objectives``, ``compiled``, ``optim``, ``train``, ``evaluate``,
``heldout``, ``config``, ``runfiles``, ``writelock``, ``rundir``, ``run_setup``, ``run``,
``compare``, ``report``, ``plots``, ``tracking``, ``checkpoint``, ``logs``, ``errors``,
``rng``, ``cli``. Nothing happens at import time.
"""

__version__ = "0.1.0"
