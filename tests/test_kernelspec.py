"""The ``ds4-workbench`` kernel spec: installed for this interpreter, found, and it starts."""

from __future__ import annotations

import json
import os
import sys

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from workbench import _blas
from workbench.kernelspec import KERNEL_NAME, SPEC_DIR, KernelSpecError, install, kernel_spec, main


@pytest.fixture
def installed(tmp_path):
    """Install into a throw-away prefix; return (install dir, a manager that sees only it)."""
    where = install(prefix=str(tmp_path))
    return where, KernelSpecManager(kernel_dirs=[str(tmp_path / "share" / "jupyter" / "kernels")])


def test_committed_spec_is_the_workbench_python_kernel():
    spec = json.loads((SPEC_DIR / "kernel.json").read_text())
    assert spec["display_name"] == "ds4-workbench (MLX)"
    assert spec["language"] == "python"
    assert spec["argv"][1:] == ["-m", "ipykernel_launcher", "-f", "{connection_file}"]


def test_install_points_the_kernel_at_this_interpreter(installed, tmp_path):
    where, ksm = installed
    assert where == str(tmp_path / "share" / "jupyter" / "kernels" / KERNEL_NAME)
    on_disk = json.loads((tmp_path / "share" / "jupyter" / "kernels" / KERNEL_NAME / "kernel.json").read_text())
    assert on_disk["argv"][0] == sys.executable
    assert on_disk["argv"][1:] == ["-m", "ipykernel_launcher", "-f", "{connection_file}"]
    assert on_disk["env"]["VIRTUAL_ENV"] == sys.prefix
    assert on_disk["env"]["PATH"] == os.path.dirname(sys.executable) + os.pathsep + "${PATH}"
    assert KERNEL_NAME in ksm.find_kernel_specs()
    spec = ksm.get_kernel_spec(KERNEL_NAME)
    assert spec.argv[0] == sys.executable and spec.display_name == "ds4-workbench (MLX)"


def test_the_installed_kernel_runs_this_environment(installed):
    """Start the kernel from the installed spec: same interpreter, venv bin first on PATH, same BLAS preload."""
    _, ksm = installed
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        code = (
            "import os, sys, json, workbench._blas as b, workbench.mlxthreads as m\n"
            "print(json.dumps([sys.executable, os.environ['PATH'].split(os.pathsep)[0], b.loaded, m.shared(),\n"
            "                  '_mlxthreads' in globals()]))"
        )
        lines: list[str] = []
        reply = kc.execute_interactive(
            code, timeout=60, output_hook=lambda msg: lines.append(msg["content"].get("text", ""))
        )
        assert reply["content"]["status"] == "ok"
        executable, first_on_path, loaded, shared_stream, leaked = json.loads("".join(lines))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert executable == sys.executable
    assert first_on_path == os.path.dirname(sys.executable)
    assert loaded == _blas.loaded
    # the start-up file ran: the widgets' worker thread may continue the notebook's arrays
    assert shared_stream and not leaked


def test_main_installs_into_a_prefix(tmp_path, capsys):
    assert main(["--prefix", str(tmp_path)]) == 0
    assert KERNEL_NAME in capsys.readouterr().out
    assert (tmp_path / "share" / "jupyter" / "kernels" / KERNEL_NAME / "kernel.json").is_file()


def test_a_malformed_spec_names_its_file(tmp_path):
    (tmp_path / "kernel.json").write_text('{"argv": ["python"], "language": "python"}')
    with pytest.raises(KernelSpecError, match=r"kernel\.json.*connection_file"):
        kernel_spec(tmp_path)
    with pytest.raises(KernelSpecError, match="not found"):
        kernel_spec(tmp_path / "absent")
