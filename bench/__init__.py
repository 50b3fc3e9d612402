"""loram-bench: the harness that measures ``loram_ref`` initializers per layer shape and per
model. The folders are the architecture, each importing only those before it:

* ``core``: what every benchmark shares (results store and its one resume protocol, row
  kinds, launchers and the worker protocol, measurement, environment, shapes and catalog,
  cost laws, intervals and paired verdicts, the defaults that pick initializers);
* ``initcost``: init time and peak memory per layer shape, one worker process per value set;
* ``loss`` and ``layer``: short-run loss on a real model, and on a layer task at every shape;
* ``sharded``: sharded init on ``torch.distributed``;
* ``gate``: the regression gate, init cost of two revisions interleaved (built on ``initcost``);
* ``cli``: the command line, the only layer that assembles reports (``reports``).

``tests/test_architecture.py`` checks the layering and that no import cycle exists.
"""
