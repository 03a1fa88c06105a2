"""``PolicyLab``: a trace replayed under chosen policies across budgets, in a notebook.

    lab = PolicyLab(read_trace("ca.jsonl"), budgets=[5, 10, 20, 40])
    lab.sweep()          # the table and the plots for the chosen policies (optimum included)
    lab.budget.value = 10; lab.show()   # miss reasons and the token strip at one budget

Every button calls one function of ``workbench.lab`` (``sweep.sweep``, ``sweep.run_policy``).
"""

from __future__ import annotations

from typing import Sequence

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go

from workbench.kv.eviction import PRESETS
from workbench.kv.policy import KVPolicy
from workbench.lab import sweep as lab_sweep
from workbench.lab.replay import Rates, ReplayResult, recorded_policy, trace_rates
from workbench.lab.trace import Trace
from workbench.widgets.common import Panel, WidgetError, table_html

POLICY_NAMES = tuple(PRESETS)


class PolicyLab(Panel):
    """Replay ``trace`` for the policies ticked, at ``budgets`` (MiB), under ``base``'s save
    policy (default: the policy the trace was recorded with) and ``rates`` (default: the
    trace's measured ones). ``table`` is the last sweep's DataFrame, ``figures`` the plots."""

    def __init__(self, trace: Trace, budgets: Sequence[float], base: KVPolicy | None = None,
                 rates: Rates | None = None) -> None:
        super().__init__("Policy lab")
        if not budgets or any(b <= 0 for b in budgets):
            raise WidgetError(f"budgets must be positive MiB values, got {list(budgets)}")
        self.trace = trace
        self.base = base or recorded_policy(trace)
        self.rates = rates or trace_rates(trace)
        self.table = pd.DataFrame()
        self.runs: dict[tuple[str, float], ReplayResult] = {}
        self.policies = widgets.SelectMultiple(options=POLICY_NAMES, value=("ds4", "ds4-2026-05", "lru"),
                                               description="policies", rows=len(POLICY_NAMES),
                                               layout=widgets.Layout(width="16em"))
        self.budget = widgets.SelectionSlider(options=sorted(float(b) for b in budgets), description="budget MiB",
                                              continuous_update=False, layout=widgets.Layout(width="28em"))
        self.shown = widgets.Dropdown(options=POLICY_NAMES + ("optimal",), value="ds4", description="strip of",
                                      layout=widgets.Layout(width="16em"))
        self.sweep_button = self.button("Sweep", self.sweep, icon="play", style="primary",
                                        tooltip="replay the ticked policies at every budget, with the optimum")
        self.show_button = self.button("Show", self.show, icon="eye",
                                       tooltip="miss reasons and token strip of one policy at the chosen budget")
        self.figures = {"sweep": go.FigureWidget(), "misses": go.FigureWidget(), "strip": go.FigureWidget()}
        self.summary = widgets.HTML("")
        self.children = [
            self.title,
            widgets.HBox([self.policies, widgets.VBox([self.budget, self.shown,
                                                       widgets.HBox([self.sweep_button, self.show_button])])]),
            self.status, self.error, self.summary,
            self.figures["sweep"], self.figures["misses"], self.figures["strip"],
        ]
        self.set_status(f"{len(trace.requests)} requests, {sum(r.prompt_tokens for r in trace.requests):,} prompt "
                        f"tokens; tick policies and press Sweep")

    def __repr__(self) -> str:
        return f"PolicyLab(requests={len(self.trace.requests)}, budgets={list(self.budget.options)})"

    def sweep(self) -> pd.DataFrame:
        """Replay the ticked policies at every budget (the optimum and the bound added)."""
        names = list(self.policies.value)
        if not names:
            raise WidgetError("tick at least one policy")
        self.table, self.runs = lab_sweep.sweep(self.trace, self.base, names, list(self.budget.options), self.rates)
        _copy(self.figures["sweep"], lab_sweep.sweep_figure(self.table))
        _copy(self.figures["misses"], lab_sweep.misses_figure(self.table))
        cols = ["policy", "budget_mb", "cached_tokens", "hit_ratio", "fraction_of_optimum", "ttft_s", "evictions"]
        self.summary.value = table_html(self.table[cols], max_height="16em", float_format="{:,.3f}")
        self.set_status(f"swept {len(names)} policies x {len(self.budget.options)} budgets")
        self.show()
        return self.table

    def show(self) -> ReplayResult:
        """The token strip of the chosen policy at the chosen budget."""
        key = (self.shown.value, float(self.budget.value))
        result = self.runs.get(key) or lab_sweep.run_policy(self.trace, self.base, key[0], key[1], self.rates)
        _copy(self.figures["strip"], lab_sweep.token_strip(result, [r.generated_tokens for r in self.trace.requests]))
        s = result.summary()
        self.set_status(f"{key[0]} at {key[1]:g} MiB: cached {s['cached_tokens']:,}/{s['prompt_tokens']:,} tokens, "
                        f"{s['evictions']} evictions")
        return result


def _copy(target: go.FigureWidget, source: go.Figure) -> None:
    with target.batch_update():
        target.data = []
        target.add_traces(list(source.data))
        target.layout = source.layout
