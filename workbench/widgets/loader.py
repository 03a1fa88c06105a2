"""``ModelLoader``: pick a ds4 GGUF, check it against the ds4 layout, load it with a progress bar.

    loader = ModelLoader("data/tiny.gguf", ctx=16384)
    loader.on_load(lambda session: print(session.args.n_layer))
    loader                      # Validate, Load; loader.session once loaded

Validate opens the file (``GGUFFile``), runs ``validate_ds4`` and, for a valid file,
``ds4_compat_problems`` (where it differs from ds4's compiled-in constants), and shows
the metadata summary and the tensor table; Load calls ``workbench.session.load`` with a
progress callback (one step per layer) and shows the same for the loaded file.
"""

from __future__ import annotations

import html
import time
from typing import Callable

import ipywidgets as widgets
import pandas as pd

from workbench.errors import WorkbenchError
from workbench.gguf.layout import ds4_compat_problems, validate_ds4
from workbench.gguf.reader import GGUFFile
from workbench.spec.args import ModelArgs
from workbench.session import Progress, Session, load
from workbench.widgets.common import MIB, Panel, int_value, size_text, table_html

SORTS = {"file order": None, "name": ("name", True), "type": ("type", True), "MiB (largest first)": ("MiB", False)}


def tensor_frame(f: GGUFFile) -> pd.DataFrame:
    """One row per tensor in file order: name, type, shape (row-major, 'a × b'), MiB."""
    return pd.DataFrame(
        [{"name": t.name, "type": t.type_name, "shape": " × ".join(map(str, t.shape)), "MiB": t.nbytes / MIB}
         for t in f.tensors.values()],
        columns=["name", "type", "shape", "MiB"])


def summary_frame(f: GGUFFile) -> pd.DataFrame:
    """The facts a researcher checks first, as (field, value) rows: from ModelArgs when the
    metadata parses, else only what the file itself says."""
    per_type: dict[str, int] = {}
    for t in f.tensors.values():
        per_type[t.type_name] = per_type.get(t.type_name, 0) + t.nbytes
    rows = [("file", f.path), ("size", f"{f.file_size / MIB:,.1f} MiB, GGUF v{f.version}, {len(f.tensors)} tensors"),
            ("bytes per type", ", ".join(f"{k} {size_text(v)}" for k, v in
                                          sorted(per_type.items(), key=lambda kv: -kv[1])))]
    try:
        a = ModelArgs.from_metadata(f.metadata)
    except WorkbenchError as err:
        rows.append(("metadata", f"not a complete ds4 configuration: {err}"))
        return pd.DataFrame(rows, columns=["field", "value"])
    rows += [
        ("name", a.name or "(unnamed)"),
        ("layers", f"{a.n_layer} (compress ratios {', '.join(map(str, a.compress_ratios))}; "
                   f"{a.n_hash_layer} hash-routed)"),
        ("widths", f"hidden {a.n_embd}, {a.n_head} heads × {a.head_dim} (rope {a.n_rot}), {a.n_head_kv} KV head, "
                   f"q lora {a.q_lora_rank}, o lora {a.o_lora_rank} × {a.o_groups} groups"),
        ("experts", f"{a.n_expert_used} of {a.n_expert} routed + {a.n_expert_shared} shared, {a.n_ff_exp} wide"),
        ("attention", f"sliding window {a.n_swa}; indexer {a.idx_heads} heads × {a.idx_dim}, top {a.idx_topk}"),
        ("vocabulary", f"{a.n_vocab:,} tokens"),
        ("context", f"{a.context_length:,} tokens (YaRN ×{a.rope_scaling_factor:g} over {a.rope_orig_ctx:,})"),
    ]
    return pd.DataFrame(rows, columns=["field", "value"])


class ModelLoader(Panel):
    """Validate and load a ds4 GGUF. After Load, ``session`` is the loaded
    :class:`~workbench.session.Session` and every ``on_load`` callback got it.
    ``tensors`` is the tensor table (DataFrame) of the last file opened."""

    def __init__(self, path: str = "data/tiny.gguf", ctx: int = 16384) -> None:
        super().__init__("Model")
        self.session: Session | None = None
        self.tensors = pd.DataFrame(columns=["name", "type", "shape", "MiB"])
        self._callbacks: list[Callable[[Session], None]] = []
        self.path_text = widgets.Text(value=str(path), description="GGUF file", placeholder="path/to/model.gguf",
                                      layout=widgets.Layout(width="32em"))
        self.ctx_input = widgets.IntText(value=ctx, step=1024, description="ctx",
                                         tooltip="context limit in tokens, at most the model's context length",
                                         layout=widgets.Layout(width="13em"))
        self.validate_button = self.button("Validate", self.validate, icon="check",
                                           tooltip="check the file against the ds4 layout")
        self.load_button = self.button("Load", self.load, icon="upload", style="primary",
                                       tooltip="load the model into a new session")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="layers",
                                            layout=widgets.Layout(width="24em"))
        self.verdict = widgets.HTML("")
        self.summary = widgets.HTML("")
        self.tensor_filter = widgets.Text(placeholder="filter names, e.g. blk.2. or exps",
                                          description="tensors", layout=widgets.Layout(width="24em"))
        self.tensor_sort = widgets.Dropdown(options=list(SORTS), value="file order", description="sort",
                                            layout=widgets.Layout(width="16em"))
        self.tensor_table = widgets.HTML("")
        self.tensor_controls = widgets.HBox([self.tensor_filter, self.tensor_sort],
                                            layout=widgets.Layout(display="none"))
        self.tensor_filter.observe(lambda _c: self.guarded(self._show_tensors), names="value")
        self.tensor_sort.observe(lambda _c: self.guarded(self._show_tensors), names="value")
        self.children = [
            self.title,
            widgets.HBox([self.path_text, self.ctx_input, self.validate_button, self.load_button]),
            widgets.HBox([self.progress, self.status]),
            self.error, self.verdict, self.summary,
            self.tensor_controls,
            self.tensor_table,
        ]
        self.stale = [self.verdict, self.summary, self.tensor_table]

    def __repr__(self) -> str:
        return f"ModelLoader(path={self.path_text.value!r}, loaded={self.session is not None})"

    def on_load(self, callback: Callable[[Session], None]) -> None:
        """Call ``callback(session)`` after every successful Load."""
        self._callbacks.append(callback)

    # ---- actions (what the buttons run) -------------------------------------------------
    def validate(self) -> list[str]:
        """Check the file: shows and returns ``validate_ds4``'s problems (empty: valid)."""
        path = self.path_text.value.strip()
        with GGUFFile(path) as f:
            problems = validate_ds4(f)
            compat = [] if problems else ds4_compat_problems(ModelArgs.from_metadata(f.metadata))
            self._show_file(f)
        self._show_verdict(path, problems, compat)
        self.set_status(f"checked {path}")
        return problems

    def load(self) -> Session:
        """Load the model (one progress step per layer); returns and keeps the session."""
        path = self.path_text.value.strip()
        self.progress.value, self.progress.bar_style = 0, ""
        self.set_status(f"loading {path} …")
        t0 = time.perf_counter()
        try:
            session = load(path, ctx=int_value(self.ctx_input, "ctx", 1, 1 << 30), progress=self._on_progress)
        except BaseException:
            self.progress.bar_style = "danger"
            self.set_status("load failed")
            raise
        self.session = session
        self.progress.bar_style = "success"
        assert session.file is not None
        self._show_file(session.file)
        self._show_verdict(path, [], ds4_compat_problems(session.args))
        self.set_status(f"loaded {session.args.n_layer} layers in {time.perf_counter() - t0:.2f} s; "
                        f"session ctx {session.ctx:,} tokens")
        for callback in self._callbacks:
            callback(session)
        return session

    # ---- views ----------------------------------------------------------------------------
    def _on_progress(self, p: Progress) -> None:
        self.progress.max = max(p.total, 1)
        self.progress.value = p.done
        self.set_status(f"layer {p.done}/{p.total} · {p.elapsed_s:.2f} s")

    def _show_verdict(self, path: str, problems: list[str], compat: list[str]) -> None:
        if problems:
            items = "".join(f"<li>{html.escape(p)}</li>" for p in problems)
            text = (f"<div style='color:#8a1f11'><b>✗ not a usable ds4 model</b> ({len(problems)} problem"
                    f"{'s' if len(problems) != 1 else ''}):<ul style='margin:2px 0'>{items}</ul></div>")
        else:
            text = f"<div style='color:#1e6b30'><b>✓ valid</b> ds4 layout: {html.escape(path)}</div>"
            if compat:
                items = "".join(f"<li>{html.escape(p)}</li>" for p in compat)
                text += (f"<details style='color:#7a5b00'><summary>differs from ds4's compiled-in constants in "
                         f"{len(compat)} setting{'s' if len(compat) != 1 else ''} (the workbench runs it; ds4 itself "
                         f"would refuse it)</summary><ul style='margin:2px 0'>{items}</ul></details>")
            else:
                text += "<div style='color:#1e6b30'>matches ds4's compiled-in constants</div>"
        self.verdict.value = text

    def _show_file(self, f: GGUFFile) -> None:
        self.summary.value = table_html(summary_frame(f), max_height="none", wrap=("value",))
        self.tensors = tensor_frame(f)
        self.tensor_controls.layout.display = None
        self._show_tensors()

    def _show_tensors(self) -> None:
        df = self.tensors
        needle = self.tensor_filter.value.strip()
        if needle:
            df = df[df["name"].str.contains(needle, regex=False)]
        sort = SORTS[self.tensor_sort.value]
        if sort is not None:
            df = df.sort_values(sort[0], ascending=sort[1], kind="stable")
        total = df["MiB"].sum() if len(df) else 0.0
        caption = (f"<div style='font-size:12px;color:#555'>{len(df)} of {len(self.tensors)} tensors, "
                   f"{total:,.2f} MiB</div>")
        self.tensor_table.value = caption + table_html(df, max_height="20em", float_format="{:,.3f}")
