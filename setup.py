"""Builds specmtp's quantized CPU kernels (a plain C extension: no torch headers, no download) on install."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "specmtp._qkernels",
            ["src/specmtp/kernels/qkernels.c"],
            depends=["src/specmtp/kernels/qtile.h"],
            extra_compile_args=["-O3", "-std=c11", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,  # without a compiler specmtp still runs (fp32/bf16); --weights q4/q8 then says why not
        )
    ]
)
