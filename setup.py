"""The one compiled module, preprocess._kernels (project metadata is in pyproject.toml).

Optional: where it does not build (no C compiler, no Python headers) the fast paths run their numpy
and PIL steps instead, with the same outputs (preprocess/kernels.py says which one runs).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "preprocess._kernels",
            ["preprocess/_kernels.c"],
            # -ffp-contract=off: the resampling coefficients must round as Pillow's do (no fused
            # multiply-add); the AVX2 loops are chosen at run time, so no -march flag.
            extra_compile_args=["-O3", "-ffp-contract=off", "-Wall", "-Wno-unused-function"],
            optional=True,
        )
    ]
)
