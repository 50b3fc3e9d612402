"""The init-cost harness: per (initializer, layer shape) cell, init time and peak memory
measured in fresh worker processes (``tasks``, ``worker``, ``runner``), the hardware floor
(``calibrate``), the result schema (``schema``, ``metrics``), comparison of two runs
(``compare``), the history trend (``history``) and pyperf export (``pyperf_format``)."""
