"""ppl_vae: variational autoencoders as Pyro programs, amortized versus mean-field inference.

Modules: ``data``, ``nets``, ``likelihoods``, ``priors``, ``model``, ``guides``, ``objectives``,
``optim``, ``train``, ``evaluate``, ``config``, ``run``, ``report``, ``compare``, ``plots``,
``cli``. Nothing happens at import time.
"""

__version__ = "0.1.0"
