"""The one compiled part: vitkit's JPEG region decoder (vitkit/data/_jpeg_region.c), linked to the system's
libjpeg-turbo (Debian/Ubuntu: libjpeg-dev). It is optional: without a compiler or the headers the install still
succeeds and vitkit decodes whole JPEGs, as Pillow and torchvision do. Everything else is in pyproject.toml."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vitkit.data._jpeg_region",
            sources=["vitkit/data/_jpeg_region.c"],
            libraries=["jpeg"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
