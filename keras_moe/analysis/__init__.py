"""Analysis: gate and routing statistics, plots and a training monitor."""

from keras_moe.analysis.callbacks import RoutingCollapseWarning
from keras_moe.analysis.callbacks import RoutingMonitor
from keras_moe.analysis.flops import FlopReport
from keras_moe.analysis.flops import flop_report
from keras_moe.analysis.flops import layer_flops
from keras_moe.analysis.flops import layer_macs
from keras_moe.analysis.plots import plot_class_gate_patterns
from keras_moe.analysis.plots import plot_expert_load
from keras_moe.analysis.plots import plot_gate_density
from keras_moe.analysis.plots import plot_gate_histograms
from keras_moe.analysis.plots import plot_patch_selection
from keras_moe.analysis.plots import plot_selection_frequency
from keras_moe.analysis.routing import GateStatistics
from keras_moe.analysis.routing import PatchRoutingStatistics
from keras_moe.analysis.routing import collect_gates
from keras_moe.analysis.routing import collect_routing
from keras_moe.analysis.routing import discriminative_routing
from keras_moe.analysis.routing import expert_load
from keras_moe.analysis.routing import gate_embedding_shuffling
from keras_moe.analysis.routing import gate_statistics
from keras_moe.analysis.routing import patch_routing_statistics

__all__ = [
    "FlopReport",
    "flop_report",
    "layer_flops",
    "layer_macs",
    "GateStatistics",
    "PatchRoutingStatistics",
    "RoutingCollapseWarning",
    "RoutingMonitor",
    "collect_gates",
    "collect_routing",
    "discriminative_routing",
    "expert_load",
    "gate_embedding_shuffling",
    "gate_statistics",
    "patch_routing_statistics",
    "plot_class_gate_patterns",
    "plot_expert_load",
    "plot_gate_density",
    "plot_gate_histograms",
    "plot_patch_selection",
    "plot_selection_frequency",
]
