"""Notebook widgets (ipywidgets 8): thin views over the library's plain objects.

* :class:`ModelLoader` — validate a ds4 GGUF and load it into a session (progress bar,
  metadata summary, tensor table).
* :class:`PrefillPanel` — prefill a prompt or a workload's first request into a session
  with live progress and tokens/s, see the likeliest next tokens, decode, reset.
* :class:`CheckpointManager` — a KV store's checkpoints: save the session, restore,
  delete, inspect (header, text, payload bytes per layer), verify.
* :class:`CacheDashboard` — an engine's telemetry as live plotly figures, a summary and
  a workload runner.
* :class:`PolicyLab` — a cache trace replayed under chosen eviction policies across
  budgets: hit tokens, TTFT and bytes against the budget with the optimum, miss reasons,
  the token strip.

Every button runs one library call a script could make; errors show in the widget's
error box instead of escaping as a traceback.
"""

from workbench.widgets.checkpoints import CheckpointManager
from workbench.widgets.common import ErrorBox, WidgetError
from workbench.widgets.dashboard import CacheDashboard
from workbench.widgets.loader import ModelLoader
from workbench.widgets.policylab import PolicyLab
from workbench.widgets.prefill import PrefillPanel

__all__ = ["ModelLoader", "PrefillPanel", "CheckpointManager", "CacheDashboard", "PolicyLab", "ErrorBox",
           "WidgetError"]
