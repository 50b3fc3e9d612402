"""The layer task: each initializer trained briefly on a synthetic layer problem at every
layer shape, with exact or sampled gradients (``spec``, ``config``, ``problem``, ``task``,
``factored``, ``worker``, ``run``), and its paired-seed findings (``verdict``)."""
