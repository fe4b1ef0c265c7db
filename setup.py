"""Packaging: maps the top-level folders onto the `flashserve` import namespace and builds the CUDA
extension `flashserve._C` from csrc/ where a CUDA build of torch and a CUDA toolkit are present.

FLASHSERVE_BUILD_EXT=0 skips the extension; =1 makes a missing toolkit an error instead of a skip.
"""
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

PACKAGE_DIR = {
    "flashserve": "client",
    "flashserve.proto": "proto/flashserve/v1",
    "flashserve.server": "server",
    "flashserve.server.backends": "server/backends",
}


def cuda_extension():
    """(ext_modules, cmdclass) for flashserve._C, or ([], {}) where CUDA cannot be built."""
    wanted = os.environ.get("FLASHSERVE_BUILD_EXT", "auto")
    if wanted == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension
    except ImportError:
        torch = None
    if torch is None or not torch.version.cuda or not CUDA_HOME:
        if wanted == "1":
            raise RuntimeError("FLASHSERVE_BUILD_EXT=1 but no CUDA build of torch or no CUDA toolkit found")
        print("flashserve: no CUDA toolkit / CUDA torch; installing without flashserve._C", file=sys.stderr)
        return [], {}
    sys.path.insert(0, os.path.join(HERE, "csrc"))
    from build_config import make_extension  # csrc/build_config.py: sources, flags, instantiation filter

    return [make_extension(HERE)], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    packages=list(PACKAGE_DIR),
    package_dir=PACKAGE_DIR,
    package_data={"flashserve.proto": ["*.proto", "*.pyi"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
