"""Placeholder for the compiled CUDA extension.

Where setup.py built the kernels, the extension module `_C.<abi>.so` sits beside this file and
Python imports it instead (extension modules take precedence over source files of the same
name). Reaching this file means the kernels were not built here."""
raise ImportError(
    "flashserve._C (the CUDA kernels) is not built in this installation: it needs a CUDA build of torch "
    "and the CUDA toolkit (nvcc) when flashserve is installed, e.g. "
    "`FLASHSERVE_BUILD_EXT=1 pip install --no-build-isolation -e .`. The server's `torch` backend works without it."
)
