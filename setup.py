"""vitkit's two compiled parts, both optional: without a compiler (or libjpeg's headers) the install still succeeds
and vitkit uses the plain path each one speeds up. Everything else is in pyproject.toml.

- vitkit/data/_jpeg_region.c, the JPEG region decoder, linked to the system's libjpeg-turbo (Debian/Ubuntu:
  libjpeg-dev); without it vitkit decodes whole JPEGs, as Pillow and torchvision do.
- vitkit/model/_gelu_tanh.c, the tanh GELU's CPU kernels (AVX2, chosen at run time); without it torch's own run.
- vitkit/model/_cpu_attention.c, self-attention's CPU kernel over torch's MKL, in torch's OpenMP threads; without
  it SDPA runs.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vitkit.data._jpeg_region",
            sources=["vitkit/data/_jpeg_region.c"],
            libraries=["jpeg"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
        Extension(
            "vitkit.model._gelu_tanh",
            sources=["vitkit/model/_gelu_tanh.c"],
            extra_compile_args=["-O2", "-pthread"],
            extra_link_args=["-pthread"],
            depends=["vitkit/model/_avx2_exp.h"],
            optional=True,
        ),
        Extension(
            "vitkit.model._cpu_attention",
            sources=["vitkit/model/_cpu_attention.c"],
            # libgomp.so.1 resolves to the copy torch has already loaded, so these are torch's own OpenMP threads.
            extra_compile_args=["-O2", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            depends=["vitkit/model/_avx2_exp.h"],
            optional=True,
        ),
    ]
)
