"""The ds4 model description: the bottom layer every other part of the workbench reads.

* :mod:`~workbench.spec.ggml` — ggml tensor types (ids, names, block geometry from ``gguf``).
* :mod:`~workbench.spec.keys` — the one table of ``deepseek4.*`` metadata keys (GGUF types,
  ModelArgs field, ds4's value, sane range).
* :mod:`~workbench.spec.args` — :class:`ModelArgs`, read from metadata by iterating that table.
* :mod:`~workbench.spec.tensors` — the one tensor table (name, shape from the args, allowed
  types, how the loader keeps it, how the synthetic writer fills it).
* :mod:`~workbench.spec.statelayout` — the session-state layout and each layer's tensor
  shapes at T tokens.

Nothing here imports another workbench package (only :mod:`workbench.errors`), so the GGUF
reader and validator, the synthetic writer, the weight loader, the state and the KV format
can all depend on it without depending on each other or on the model.
"""
