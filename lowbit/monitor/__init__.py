"""Loss-spike monitoring: per-layer RMS(g^2 / u) spikes, the loss spikes they precede, and actions.

`SpikeMonitor` is the entry point; `QuantHealth` runs beside it (per-layer int8/fp8 SQNR);
`RobustThreshold` configures what counts as a spike;
`read_jsonl` and `plot_spikes` work on a run after the fact.
"""

from lowbit.monitor.detector import RobustThreshold
from lowbit.monitor.monitor import SpikeMonitor
from lowbit.monitor.plot import plot_spikes
from lowbit.monitor.quant_health import QuantHealth
from lowbit.monitor.writers import read_jsonl

__all__ = ["QuantHealth", "RobustThreshold", "SpikeMonitor", "plot_spikes", "read_jsonl"]
