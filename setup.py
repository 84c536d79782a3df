# Metadata lives in pyproject.toml; this file only declares the C extension.
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "memscope_async.attribution._core",
            sources=["attribution/_core.c"],
            depends=["attribution/_ptrmap.h", "attribution/_u64map.h", "attribution/_stacks.h", "attribution/_tasks.h", "attribution/_shadow.h", "attribution/_sysmem.h", "attribution/_tstate.h"],
            extra_compile_args=["-O2", "-std=c11", "-fvisibility=hidden", "-Wall", "-Wno-missing-braces"],
        )
    ]
)
