"""Run by the ``ds4-workbench`` kernel at start (its ``PYTHONSTARTUP``): MLX arrays of the
notebook go on a stream the widgets' worker thread may use (:mod:`workbench.mlxthreads`),
so a Stop button can be clicked while a prefill runs."""

import workbench.mlxthreads as _mlxthreads

_mlxthreads.share_default_stream()
del _mlxthreads
