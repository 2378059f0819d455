"""ppl_vae: variational autoencoders as Pyro programs; amortized, semi-amortized and
mean-field (per-datapoint) inference compared.

Modules by layer (README.md, "The package, by layer"): the base (``errors``, ``logs``, ``rng``,
``seeds``, ``memory``, ``config``, ``registry``, ``config_file``, ``tracking``); data and
networks (``data``, ``batching``, ``nets``, ``likelihoods``, ``priors``, ``families``); the
program (``model``, ``objectives``, ``protocol``, ``guides``); speed (``compiled``,
``optim``); a step, q* and estimates (``step``, ``local_fit``, ``distributed``,
``evaluate``); training (``loopstate``, ``callbacks``, ``train``, ``heldout``); figures
(``plots``, ``gap_plots``); a run (``build``, ``runfiles``, ``writelock``, ``checkpoint``,
``rundir``, ``run_setup``, ``run``, ``evaluation``, ``compute``); the comparison
(``results``, ``compare_plan``, ``compare``, ``budget_curves``, ``report``,
``report_tables``); the command line (``cli``). Nothing happens at import time.
"""

__version__ = "0.1.0"
