"""``workbench doctor``: the maps parser, the report, the measured rate and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from workbench import _blas
from workbench.cli import main
from workbench.doctor import blas_from_maps, diagnose, format_report

VENV = "/srv/project/.venv/lib/python3.11/site-packages"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r0.3.21.so"
REFERENCE = f"{VENV}/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0"
LAPACK = f"{VENV}/mlx_cpu.libs/liblapack-86b2c207.so.3.10.0"

# The shape of a real /proc/self/maps: several mappings per file, anonymous regions,
# pseudo-paths in brackets, a deleted file and a path with a space in it.
FAKE_MAPS = f"""\
55d4c9a00000-55d4c9a21000 r--p 00000000 fd:01 1234  /usr/bin/python3.11
7f1e2c000000-7f1e2c021000 rw-p 00000000 00:00 0
7f1e30000000-7f1e30200000 r--p 00000000 fd:01 5678  {REFERENCE}
7f1e30200000-7f1e30400000 r-xp 00200000 fd:01 5678  {REFERENCE}
7f1e30400000-7f1e30600000 r--p 00000000 fd:01 9012  {LAPACK}
7f1e31000000-7f1e31800000 r--p 00000000 fd:01 3456  {OPENBLAS}
7f1e31800000-7f1e32000000 r-xp 00800000 fd:01 3456  {OPENBLAS}
7f1e33000000-7f1e33001000 r--p 00000000 fd:01 7777  /tmp/my dir/libcblas.so (deleted)
7ffd5b5e0000-7ffd5b601000 rw-p 00000000 00:00 0     [stack]
7ffd5b7f0000-7ffd5b7f2000 r-xp 00000000 00:00 0     [vdso]
"""


def test_maps_parser_prefers_the_preloaded_openblas_and_lists_each_file_once():
    info = blas_from_maps(FAKE_MAPS)
    assert info["kind"] == "openblas"
    assert info["path"] == OPENBLAS
    assert info["mapped"] == [REFERENCE, OPENBLAS]  # first-seen order, no lapack, no cblas, no duplicates


def test_maps_parser_reports_the_reference_blas_alone():
    text = "\n".join(line for line in FAKE_MAPS.splitlines() if "openblas" not in line)
    info = blas_from_maps(text)
    assert info == {"kind": "reference", "path": REFERENCE, "mapped": [REFERENCE]}


def test_maps_parser_without_any_blas():
    assert blas_from_maps("7ffd5b5e0000-7ffd5b601000 rw-p 00000000 00:00 0 [stack]\n") == {
        "kind": "none", "path": None, "mapped": []
    }


def test_maps_parser_keeps_spaces_in_paths():
    line = "7f00-7f10 r--p 00000000 fd:01 1 /opt/my libs/libopenblas.so.0\n"
    assert blas_from_maps(line)["path"] == "/opt/my libs/libopenblas.so.0"


def test_diagnose_reports_every_section_and_a_positive_rate():
    report = diagnose(sizes=(128, 256), repeats=2)
    assert set(report) == {"python", "platform", "mlx", "blas", "pth_hook", "env", "matmul", "verdict", "warnings"}
    assert report["python"]["executable"] == sys.executable
    assert report["mlx"]["error"] is None and report["mlx"]["version"]
    assert [m["n"] for m in report["matmul"]] == [128, 256]
    for m in report["matmul"]:
        assert m["gflops"] > 0 and m["seconds"] > 0
        assert m["gflops"] == pytest.approx(2 * m["n"] ** 3 / m["seconds"] / 1e9)
    assert report["verdict"].split(":")[0] in {"ok", "slow"}
    assert report["verdict"].startswith("slow") == bool(report["warnings"])
    assert report["verdict"] in format_report(report)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")
def test_diagnose_sees_the_blas_this_process_loaded():
    report = diagnose(measure=False)
    assert report["matmul"] == []
    if _blas.loaded:
        assert report["blas"]["kind"] == "openblas"
        assert os.path.realpath(report["blas"]["path"]) in {
            os.path.realpath(p) for p in report["blas"]["mapped"]
        }
    else:
        assert report["blas"]["kind"] == "reference"


@pytest.mark.skipif(sys.platform != "linux", reason="the reference BLAS ships only in the Linux wheel")
def test_doctor_json_flags_the_reference_blas_when_openblas_is_disabled():
    env = dict(os.environ, WORKBENCH_NO_OPENBLAS="1")
    out = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "doctor", "--json", "--sizes", "128", "--repeats", "1"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["blas"]["kind"] == "reference"
    assert report["pth_hook"]["preloaded"] is None
    assert report["verdict"].startswith("slow")
    assert any("reference BLAS" in w and "WORKBENCH_NO_OPENBLAS" in w for w in report["warnings"])


def test_doctor_json_through_the_cli(capsys):
    assert main(["doctor", "--json", "--sizes", "64", "128", "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [m["n"] for m in report["matmul"]] == [64, 128]
    assert all(m["gflops"] > 0 for m in report["matmul"])
    assert report["pth_hook"]["path"].endswith(_blas.PTH_NAME)


def test_doctor_text_without_measuring(capsys):
    assert main(["doctor", "--no-measure"]) == 0
    out = capsys.readouterr().out
    heads = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert {"python", "mlx", "blas", "verdict"} <= set(heads) and "matmul" not in heads


def test_doctor_rejects_non_positive_sizes(capsys):
    for bad in (["--sizes", "0"], ["--repeats", "0"]):  # a usage error (exit 2) naming the argument
        with pytest.raises(SystemExit) as exc:
            main(["doctor", *bad])
        assert exc.value.code == 2
        assert bad[0] in capsys.readouterr().err
