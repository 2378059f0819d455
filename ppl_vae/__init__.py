"""ppl_vae: variational autoencoders as Pyro programs; amortized, semi-amortized and
mean-field (per-datapoint) inference compared.

Modules: ``data``, ``batching``, ``nets``, ``likelihoods``, ``priors``, ``model``,
``protocol`` (the guide protocol), ``guides``, ``local_fit`` (q* for held-out rows),
``objectives``, ``compiled``, ``optim``, ``step``, ``loopstate``, ``callbacks``, ``train``,
``evaluate``, ``heldout``, ``config``, ``registry``, ``build``, ``runfiles``, ``writelock``,
``rundir``, ``run_setup``, ``run``, ``compare``, ``report``, ``plots``, ``tracking``,
``checkpoint``, ``logs``, ``errors``, ``rng``, ``cli``. Nothing happens at import time.
"""

__version__ = "0.1.0"
