# ds4-workbench: the two commands every user runs are `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
VBIN    := $(VENV)/bin
STAMP   := $(VENV)/.installed
TINY    := data/tiny.gguf

.PHONY: demo test bench lab venv blas native clean browser-deps

venv: $(STAMP)

# PYTHONWARNINGS=ignore: setuptools' informational box about editable installs is not for users.
$(STAMP): pyproject.toml
	@echo "make: creating $(VENV)/ and installing ds4-workbench with its dependencies (MLX, NumPy, pandas,"
	@echo "      plotly, ipywidgets, JupyterLab, tokenizers, pytest, nanobind; see pyproject.toml): a minute or two, once"
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	PYTHONWARNINGS=ignore $(VPY) -m pip install -q -e '.[test,native]'
	@echo "make: OpenBLAS for MLX's CPU backend (Linux)"
	$(MAKE) --no-print-directory blas
	touch $(STAMP)

# OpenBLAS for MLX's CPU backend: the mlx[cpu] wheel bundles the slow netlib reference
# BLAS. Install Debian's OpenBLAS where we may (root), then make every process of the
# venv load it first through a .pth hook (see workbench/_blas.py).
blas:
	@if [ "$$(uname -s)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas.so.0'; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1)) || true; \
	  fi; \
	fi
	@$(VPY) -m workbench._blas --install-pth

# The native dequantization kernels (native/dequant.cpp, an MLX primitive; ~30 s on two
# cores). Optional: without a compiler or cmake the pure-MLX decoders are used (same bits).
native: $(STAMP)
	@echo "make: building the native dequantization kernels (log: build/native.log)"
	@mkdir -p build
	@(cmake -S native -B build/native -DPython_EXECUTABLE=$(abspath $(VPY)) -DOUTPUT_DIR=$(CURDIR)/workbench/gguf \
	  && cmake --build build/native -j2) >build/native.log 2>&1 \
	  || echo "warning: native kernels not built (see build/native.log); using the pure-MLX dequantizers"

$(TINY): $(STAMP)
	@echo "make: synthesizing the tiny test model (random weights, the real tokenizer) -> $(TINY)"
	$(VBIN)/workbench synth --preset tiny --out $(TINY)

# The demo keeps its cache in build/demo-kv (list it with `workbench kv ls build/demo-kv`).
demo: $(STAMP) native $(TINY)
	$(VBIN)/workbench demo --model $(TINY)

test: $(STAMP) native $(TINY) browser-deps
	$(VPY) -m workbench.kernelspec --prefix $(VENV)
	$(VPY) -m pytest -q -p no:cacheprovider tests notebooks --nbval --nbval-kernel-name ds4-workbench \
	  --nbval-sanitize-with notebooks/sanitize.cfg --nbval-cell-timeout 300

# Debian's Chromium for the JupyterLab browser test (skipped where it cannot be had).
browser-deps:
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -qq chromium >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)) || \
	  echo "warning: chromium could not be installed; the browser test will be skipped"; \
	fi

# The full suite (synthesizes a 9.5 GB real-dims-4 model under build/bench-models the first time);
# `workbench bench --quick` finishes in a few minutes.
bench: $(STAMP) native $(TINY)
	$(VPY) -m pip install -q -e '.[bench]'
	$(VBIN)/workbench bench --full

# Jupyter refuses to run as root without --allow-root (containers often run as root).
lab: $(STAMP) native $(TINY)
	$(VPY) -m workbench.kernelspec --prefix $(VENV)
	$(VBIN)/jupyter lab --notebook-dir=notebooks $$([ "$$(id -u)" = 0 ] && echo --allow-root)

clean:
	rm -rf build data/*.gguf workbench/gguf/_native*.so
