"""The native core (evtrace/_core/, its files by job: see core.h) and the JSON reader's scanner
(evtrace/_scan.c): plain C against the CPython API. The CUDA runtime is found by soname at run
time, so it builds with no GPU, CUDA headers or toolkit."""

from pathlib import Path

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "evtrace._core",
            sorted(str(p) for p in Path("evtrace/_core").glob("*.c")),
            depends=["evtrace/_core/core.h"],
            extra_compile_args=[
                "-O2",
                "-fvisibility=hidden",  # the files' shared et_ functions stay inside the module
                "-std=c11",
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",
                "-Wno-missing-field-initializers",
                "-Wno-cast-function-type",
            ],
            libraries=["dl", "pthread"],
        ),
        # the Chrome JSON reader's scanner (evtrace/formats/chrome_read.py): plain C, no libraries
        Extension(
            "evtrace._scan", ["evtrace/_scan.c"], extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"]
        ),
    ]
)
