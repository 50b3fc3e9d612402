"""Layer statistics, under one name: what the data-aware initializers read about a layer
(:mod:`.types`: ``LoraSBStats``, ``LoraDAStats``, each validated on construction), the kinds
a registry entry declares (:mod:`.kinds`: how to make synthetic ones, how to collect real
ones, how they follow the learning rate), and the collectors (:mod:`.collect`: the paper's
statistics pass over a model and its training data, or over a layer task's gradient oracle).
"""

from .collect import CollectContext, GradientOracle
from .kinds import NO_STATISTICS, LORA_DA_STATISTICS, LORA_SB_STATISTICS, Statistics, StatisticsKind
from .types import LoraDAStats, LoraSBStats

__all__ = ["CollectContext", "GradientOracle", "LORA_DA_STATISTICS", "LORA_SB_STATISTICS", "LoraDAStats",
           "LoraSBStats", "NO_STATISTICS", "Statistics", "StatisticsKind"]
