"""The regression gate: a base revision's ``loram_ref`` and the working tree's measured in
interleaved rounds of the init-cost worker (``trees``, ``continuous``), the decision rule
(``rule``), its measured error rates (``rates``) and planted slowdowns for the self-test
(``plant``)."""
