"""Builds fastmesh._core from Cython. Set FASTMESH_CFLAGS to change the
optimisation flags and FASTMESH_CYTHON_ANNOTATE=1 for Cython's HTML report."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

cflags = os.environ.get("FASTMESH_CFLAGS", "-O2").split() + ["-Wall", "-Wno-unused-function"]

core = Extension(
    "fastmesh._core",
    ["src/fastmesh/_core.pyx"],
    define_macros=[("_GNU_SOURCE", "1")],
    extra_compile_args=cflags,
)

setup(
    ext_modules=cythonize(
        [core],
        include_path=["src"],
        annotate=bool(os.environ.get("FASTMESH_CYTHON_ANNOTATE")),
        compiler_directives={"language_level": 3, "embedsignature": True},
    ),
)
