"""Run a notebook in a real JupyterLab, in headless Debian Chromium, and read what rendered.

:func:`jupyter_lab` starts ``python -m jupyterlab`` on a free loopback port with a token,
an isolated Jupyter config/runtime/settings tree and the ``ds4-workbench`` kernel
installed into a throw-away prefix. :func:`run_notebook_in_lab` copies a notebook
(outputs and saved widget state stripped, so whatever renders comes from this run)
into a temporary root laid out like the checkout (``notebooks/NAME.ipynb`` with
``data`` linked beside it), opens it in Chromium through Playwright, clicks
Run → Run All Cells, waits for every code cell to finish (or one to fail) and the
kernel to go idle, waits for the expected widgets and plots to appear, and returns a
:class:`LabRun` with the element counts, the error outputs and a full-height
screenshot. ``python tests/browser.py NOTEBOOK...`` does the same from a shell.

Every wait has a timeout and the server's process group is killed on the way out,
so a broken front end fails the test instead of hanging it. Nothing here downloads a
browser: it uses ``/usr/bin/chromium`` (``apt-get install chromium``) or skips.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Page

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "build" / "browser"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
KERNEL_NAME = "ds4-workbench"

# What the front end draws, inside a cell's output area. ipywidgets 8 gives every widget
# view ``jupyter-widgets`` plus a per-kind class; plotly.js marks each drawn figure
# ``js-plotly-plot``: the FigureWidget's (anywidget) view, and the output element itself
# for ``fig.show()``, which the jupyterlab-plotly mime renderer draws as ``jp-RenderedPlotly``.
WIDGET = ".jp-OutputArea .jupyter-widgets"
SLIDER = ".jp-OutputArea .widget-slider"
BUTTON = ".jp-OutputArea .widget-button"
HTML = ".jp-OutputArea .widget-html"
PLOTLY = ".jp-OutputArea .js-plotly-plot"
PLOTLY_MIME = ".jp-OutputArea .jp-RenderedPlotly"
PLOTLY_SVG = ".jp-OutputArea .js-plotly-plot svg.main-svg"

# JupyterLab user settings for a quiet, deterministic page: no news/update toasts
# over the notebook, and every cell attached to the DOM (no virtual scrolling).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True,
    },
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}

# Run in the page. Run All is over when the kernel is idle, no cell is queued or running
# ("[*]") and either every code cell has a number or a cell failed (JupyterLab then
# drops the cells queued after it back to "[ ]").
_ERROR_TEXT_JS = """(t) => t.includes('Traceback') || t.includes('Error displaying widget')
  || t.includes('Error rendering')"""
_CELLS_DONE_JS = f"""() => {{
  const isError = {_ERROR_TEXT_JS};
  const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')].map(p => p.textContent);
  const status = document.querySelector('.jp-Notebook-ExecutionIndicator');
  const failed = [...document.querySelectorAll('.jp-OutputArea-output')].some(o => isError(o.innerText));
  return prompts.length > 0 && status !== null && status.getAttribute('data-status') === 'idle'
    && !prompts.some(p => p.includes('*'))
    && (failed || prompts.every(p => /\\[\\d+\\]/.test(p)));
}}"""
_COUNTS_MET_JS = """(expect) => Object.entries(expect).every(
  ([selector, n]) => document.querySelectorAll(selector).length >= n)"""
_ERRORS_JS = f"""() => [...document.querySelectorAll('.jp-OutputArea-output')]
  .map(o => o.innerText).filter({_ERROR_TEXT_JS}).map(t => t.slice(0, 2000))"""


def unavailable() -> str | None:
    """Why the browser test cannot run here (None when it can)."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} not found (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "python package playwright not installed (pip install -e '.[test]')"
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        return "jupyterlab not installed"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Lab:
    """A running JupyterLab server: ``url`` is its base (``http://127.0.0.1:PORT/``)."""

    url: str
    token: str
    root: Path
    process: subprocess.Popen
    log: Path

    def notebook_url(self, relative: str) -> str:
        """The page that opens ``relative`` (a path under ``root``) in the Lab UI."""
        return f"{self.url}lab/tree/{relative}?token={self.token}"

    def kernel_state(self, relative: str) -> str | None:
        """The execution state of the kernel of ``relative``'s session (None: no session yet)."""
        with urllib.request.urlopen(f"{self.url}api/sessions?token={self.token}", timeout=10) as reply:
            sessions = json.load(reply)
        for session in sessions:
            if session.get("path") == relative and session.get("kernel"):
                return session["kernel"].get("execution_state")
        return None

    def wait_for_kernel(self, relative: str, timeout_s: float) -> None:
        """Block until the notebook's kernel is started and idle; RuntimeError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (state := self.kernel_state(relative)) != "idle":
            if time.monotonic() > deadline:
                raise RuntimeError(f"kernel of {relative} not idle within {timeout_s:.0f} s (state {state}):\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, chars: int = 4000) -> str:
        """The last ``chars`` characters of the server's combined stdout/stderr."""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _prepare_home(home: Path) -> dict[str, str]:
    """Install the kernel and lab settings under ``home``; return the server's environment.

    ``JUPYTER_PATH`` puts the throw-away prefix (holding the ``ds4-workbench`` kernel)
    before the environment's own data dir, whose lab extensions (ipywidgets manager,
    jupyterlab-plotly, anywidget) still load.
    """
    from workbench.kernelspec import install

    prefix = home / "prefix"
    install(prefix=str(prefix))
    settings = home / "settings"
    for name, values in LAB_SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = dict(os.environ)
    env.update(
        JUPYTER_PATH=str(prefix / "share" / "jupyter"),
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTER_DATA_DIR=str(home / "data"),
        IPYTHONDIR=str(home / "ipython"),
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
    )
    env.pop("JUPYTER_PREFER_ENV_PATH", None)
    return env


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (server and kernels), SIGKILL after 10 s."""
    if process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def jupyter_lab(root: Path, home: Path, start_timeout_s: float = 90.0) -> Iterator[Lab]:
    """Serve ``root`` with JupyterLab on a free loopback port; kill it on exit.

    ``home`` receives the isolated Jupyter tree and the server log (``lab.log``).
    Raises RuntimeError, with the log's tail, if the server exits or does not answer
    ``/api/status`` within ``start_timeout_s`` seconds.
    """
    home.mkdir(parents=True, exist_ok=True)
    env = _prepare_home(home)
    port, token = free_port(), secrets.token_hex(16)
    log = home / "lab.log"
    cmd = [
        sys.executable, "-m", "jupyterlab",
        "--no-browser", "--allow-root",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--LabApp.user_settings_dir={env['JUPYTERLAB_SETTINGS_DIR']}",
        f"--LabApp.workspaces_dir={env['JUPYTERLAB_WORKSPACES_DIR']}",
        "--LabApp.extension_manager=readonly",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    lab = Lab(f"http://127.0.0.1:{port}/", token, root, process, log)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {process.returncode}:\n{lab.log_tail()}")
            try:
                with urllib.request.urlopen(f"{lab.url}api/status?token={token}", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"jupyter lab did not answer within {start_timeout_s:.0f} s:\n{lab.log_tail()}")
            time.sleep(0.5)
        yield lab
    finally:
        _stop(process)


def stage_notebook(notebook: Path, root: Path, kernel_name: str = KERNEL_NAME,
                   links: Sequence[str] = ("data",)) -> str:
    """Copy ``notebook`` to ``root/notebooks/`` with outputs and widget state stripped.

    The copy runs in ``kernel_name``; each of ``links`` (paths relative to the
    checkout) is symlinked into ``root`` so the notebook's relative paths
    (``../data/...``) resolve as in the checkout. Returns the copy's path relative to
    ``root``, as the Lab URL wants it.
    """
    nb = json.loads(notebook.read_text())
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
    nb.setdefault("metadata", {}).pop("widgets", None)
    nb["metadata"]["kernelspec"] = {"name": kernel_name, "display_name": kernel_name, "language": "python"}
    target = root / "notebooks" / notebook.name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(nb, indent=1))
    for name in links:
        source = REPO / name
        if source.exists() and not (root / name).exists():
            (root / name).symlink_to(source, target_is_directory=source.is_dir())
    return f"notebooks/{notebook.name}"


@dataclass
class LabRun:
    """What one Run All produced in the browser.

    ``counts`` maps each selector asked for to the number of matching elements;
    ``errors`` holds the text of outputs that show a traceback or a widget/renderer
    error; ``page_errors`` uncaught JavaScript exceptions; ``seconds`` the wall time
    from opening the page to the last render; ``run_seconds`` from Run All to idle;
    ``probe`` what the caller's probe returned; ``lab_log`` the server log's tail.
    """

    notebook: str
    code_cells: int
    counts: dict[str, int]
    errors: list[str]
    page_errors: list[str]
    screenshot: Path
    seconds: float
    run_seconds: float
    probe: dict
    lab_log: str = field(repr=False)


def _open_run_all(page: Page, timeout_ms: float) -> None:
    """Click Run → Run All Cells in the menu bar, as a person would."""
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click(timeout=timeout_ms)
    page.locator('.lm-Menu-item:has(.lm-Menu-itemLabel:text-is("Run All Cells"))').click(timeout=timeout_ms)


def run_notebook_in_lab(
    notebook: Path,
    expect: Mapping[str, int],
    workdir: Path,
    *,
    kernel_name: str = KERNEL_NAME,
    run_timeout_s: float = 240.0,
    render_timeout_s: float = 60.0,
    screenshot: Path | None = None,
    probe: Callable[[Page], dict] | None = None,
) -> LabRun:
    """Open ``notebook`` in JupyterLab, Run All Cells, and report what rendered.

    ``expect`` maps CSS selectors to the minimum count to wait for after the kernel
    is idle (up to ``render_timeout_s``; a shortfall is reported in ``counts``, not
    raised). ``run_timeout_s`` bounds Run All → the run over and the kernel idle
    (playwright's TimeoutError past it). ``probe`` then gets the live page to
    interact with the rendered widgets; its dict lands in ``LabRun.probe``. The
    screenshot (default ``build/browser/<stem>.png``) shows the whole notebook, taken
    after the probe.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    root, home = workdir / "root", workdir / "home"
    relative = stage_notebook(notebook, root, kernel_name)
    screenshot = screenshot or SCREENSHOTS / f"{notebook.stem}.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    step_ms = 60_000
    with jupyter_lab(root, home) as lab, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=list(CHROMIUM_FLAGS), timeout=step_ms)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(step_ms)
            page_errors: list[str] = []
            page.on("pageerror", lambda err: page_errors.append(str(err)))
            start = time.monotonic()
            page.goto(lab.notebook_url(relative), wait_until="domcontentloaded")
            page.wait_for_selector(".jp-Notebook .jp-CodeCell")
            lab.wait_for_kernel(relative, step_ms / 1000)
            page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]')
            code_cells = page.locator(".jp-Notebook .jp-CodeCell").count()
            run_start = time.monotonic()
            _open_run_all(page, step_ms)
            page.wait_for_function(_CELLS_DONE_JS, timeout=run_timeout_s * 1000, polling=250)
            run_seconds = time.monotonic() - run_start
            try:
                page.wait_for_function(_COUNTS_MET_JS, arg=dict(expect), timeout=render_timeout_s * 1000, polling=250)
            except PlaywrightTimeout:
                pass  # the counts below show what is missing
            seconds = time.monotonic() - start
            counts = {sel: page.locator(sel).count() for sel in expect}
            errors = page.evaluate(_ERRORS_JS)
            probed = probe(page) if probe and not errors else {}
            height = page.evaluate(
                "() => { const n = document.querySelector('.jp-WindowedPanel-outer')"
                " || document.querySelector('.jp-Notebook'); return n ? n.scrollHeight : 1000; }"
            )
            page.set_viewport_size({"width": 1400, "height": min(max(1000, height + 200), 12000)})
            page.evaluate("() => document.querySelectorAll('.jp-WindowedPanel-outer').forEach(n => n.scrollTo(0, 0))")
            page.wait_for_timeout(500)
            page.screenshot(path=str(screenshot))
        finally:
            browser.close()
        return LabRun(relative, code_cells, counts, errors, page_errors, screenshot, seconds, run_seconds, probed, lab.log_tail())



def main(argv: Sequence[str] | None = None) -> int:
    """``python tests/browser.py NOTEBOOK...``: run each in JupyterLab and print what rendered."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("notebooks", nargs="+", type=Path)
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    failed = 0
    for notebook in args.notebooks:
        with tempfile.TemporaryDirectory(prefix="ds4-lab-") as tmp:
            run = run_notebook_in_lab(notebook.resolve(), {WIDGET: 0, PLOTLY: 0}, Path(tmp), render_timeout_s=5)
        failed += bool(run.errors)
        print(json.dumps({**run.__dict__, "screenshot": str(run.screenshot), "lab_log": None}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
