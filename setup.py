"""The compiled modules (project metadata is in pyproject.toml).

- preprocess._kernels: the fast paths' resize and patchify (preprocess/kernels.py);
- sidecar._scan: one pass counting and copying each arriving body chunk (sidecar/bodies.py).

Both are optional: where they do not build (no C compiler, no Python headers) the same steps run in
numpy and PIL, with the same results.
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
        ),
        Extension(
            "sidecar._scan",
            ["sidecar/_scan.c"],
            extra_compile_args=["-O3", "-Wall"],  # AVX2 chosen at run time
            optional=True,
        ),
    ]
)
