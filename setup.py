"""The compiled kernel (server/engine/_kernel.c), built by the package's own install.

Everything else about the package is in pyproject.toml. The extension is optional: an
install without a C compiler still succeeds, and the engine runs its pure-Python
reference instead (server/engine/kernel.py says so once, on stderr).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "memorywall.server.engine._kernel",
            sources=["server/engine/_kernel.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
