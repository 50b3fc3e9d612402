"""Layer statistics, under one name: what the data-aware initializers read about a layer
(:mod:`.types`: ``LoraSBStats``, ``LoraDAStats``, ``GradientStats``, ``InputCovarianceStats``,
``InputMomentsStats``), the kinds
a registry entry declares (:mod:`.kinds`: how to make synthetic ones, how to collect real
ones, how they follow the learning rate), the one pass that accumulates what every kind reads (:mod:`.moments`), and the
collectors (:mod:`.collect`: each paper's statistics over a model and its training data, or over a layer task's gradient oracle).
"""

from .collect import CollectContext, GradientOracle
from .kinds import NO_STATISTICS, LORA_DA_STATISTICS, LORA_SB_STATISTICS, Statistics, StatisticsKind, collect_kinds
from .types import GradientStats, InputCovarianceStats, InputMomentsStats, LoraDAStats, LoraSBStats

__all__ = ["CollectContext", "GradientOracle", "GradientStats", "InputCovarianceStats", "InputMomentsStats",
           "LORA_DA_STATISTICS", "LORA_SB_STATISTICS", "LoraDAStats", "LoraSBStats", "NO_STATISTICS", "Statistics",
           "StatisticsKind", "collect_kinds"]
