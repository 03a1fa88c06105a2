"""Install the ``ds4-workbench`` Jupyter kernel for the interpreter that runs this module.

The committed spec (``kernels/ds4-workbench/kernel.json``) names plain ``python``; the
installed copy runs *this* environment's interpreter (``sys.executable``, the venv's
``bin/python``, not its resolved symlink), so the kernel imports the workbench and runs
the OpenBLAS ``.pth`` hook of that venv (:mod:`workbench._blas`). The installed
environment also puts the venv's ``bin`` first on ``PATH`` (``!workbench ...`` in a
cell finds the CLI of the same venv) and sets ``VIRTUAL_ENV``; jupyter_client
expands ``${PATH}`` from the server's environment when it starts the kernel.
``PYTHONSTARTUP`` names :mod:`workbench.kernel_startup`, which IPython runs when the
kernel starts: it puts the notebook's MLX arrays on a stream the widgets' worker thread
may use (their Stop button needs the work off the kernel's main thread).

    python -m workbench.kernelspec --prefix .venv     # into .venv/share/jupyter/kernels
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from workbench.errors import WorkbenchError

KERNEL_NAME = "ds4-workbench"
SPEC_DIR = Path(__file__).resolve().parents[1] / "kernels" / KERNEL_NAME


class KernelSpecError(WorkbenchError):
    """The committed kernel spec is missing or malformed."""


def kernel_spec(spec_dir: Path = SPEC_DIR) -> dict:
    """The committed ``kernel.json`` (in ``spec_dir``) adapted to this interpreter.

    ``argv[0]`` becomes ``sys.executable``; ``env`` gains ``VIRTUAL_ENV``
    (``sys.prefix``) and ``PATH`` with the interpreter's directory first, followed by
    ``${PATH}`` for jupyter_client to expand at kernel start, and ``PYTHONSTARTUP``
    the kernel start-up file (:mod:`workbench.kernel_startup`).
    """
    path = spec_dir / "kernel.json"
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise KernelSpecError(f"{path}: kernel spec not found (is the workbench installed from its checkout?)") from None
    except json.JSONDecodeError as err:
        raise KernelSpecError(f"{path}: not valid JSON ({err})") from None
    argv = spec.get("argv")
    if not (isinstance(argv, list) and argv and "{connection_file}" in argv):
        raise KernelSpecError(f"{path}: 'argv' must be a list that passes {{connection_file}}")
    env = dict(spec.get("env", {}))
    env["VIRTUAL_ENV"] = sys.prefix
    env["PATH"] = os.path.dirname(os.path.abspath(sys.executable)) + os.pathsep + "${PATH}"
    env["PYTHONSTARTUP"] = str(Path(__file__).resolve().with_name("kernel_startup.py"))
    return {**spec, "argv": [sys.executable, *argv[1:]], "env": env}


def install(prefix: str | None = None, user: bool = False) -> str:
    """Install the kernel under ``prefix`` (``PREFIX/share/jupyter/kernels/ds4-workbench``).

    With neither ``prefix`` nor ``user`` it installs into ``sys.prefix``; ``user``
    installs into the user's Jupyter data directory instead. The other files next
    to the committed ``kernel.json`` (logos) are copied along. Returns the installed
    directory.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    spec = kernel_spec()
    if prefix is None and not user:
        prefix = sys.prefix
    with tempfile.TemporaryDirectory(prefix="ds4-kernelspec-") as tmp:
        staged = Path(tmp) / KERNEL_NAME
        shutil.copytree(SPEC_DIR, staged)
        (staged / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
        return KernelSpecManager().install_kernel_spec(
            str(staged), kernel_name=KERNEL_NAME, user=user, prefix=None if user else prefix
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.kernelspec", description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--prefix", help="environment prefix to install into (default: sys.prefix)")
    where.add_argument("--user", action="store_true", help="install into the user's Jupyter data directory")
    args = parser.parse_args(argv)
    try:
        path = install(args.prefix, user=args.user)
    except WorkbenchError as err:
        print(f"kernelspec: error: {err}", file=sys.stderr)
        return 1
    print(f"kernel {KERNEL_NAME!r} installed in {path} -> {sys.executable}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
