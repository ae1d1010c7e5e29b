"""Build script.  Metadata lives in pyproject.toml; this file builds the optional C++ CPU
kernels in csrc/ as ``munba_kernels._C_cpu`` with torch.utils.cpp_extension.

The extension is optional: when it cannot be built (no compiler, no torch at build time) the
package still installs, and ``backend="auto"`` falls back to the plain-torch reference with
one warning.  Install with ``pip install --no-build-isolation -e .`` so the build sees the
installed torch.  Set ``MUNBA_REQUIRE_CPP=1`` to make a failed build an error instead.
"""

import os
import sys

from setuptools import setup

# -O3 vectorises the kernels' plain loops for the baseline x86-64 ISA (no -march=native: the
# wheel must run on any x86-64).  -ffp-contract=off keeps a*b+c as two roundings, identical
# on every machine and to the reference backend.  -fno-math-errno lets sqrt vectorise.
# -fopenmp: ATen's at::parallel_for is header code that parallelises with OpenMP pragmas.
COMPILE_ARGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
LINK_ARGS = ["-fopenmp"]


def _build_config() -> dict:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as err:
        _skip(f"torch is not importable at build time ({err}); use --no-build-isolation")
        return {}

    class OptionalBuildExtension(BuildExtension):
        """Turns a failed compile into a warning, unless MUNBA_REQUIRE_CPP=1."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # compiler missing or failing: the package still works
                if os.environ.get("MUNBA_REQUIRE_CPP") == "1":
                    raise
                _skip(f"building the extension failed ({type(err).__name__}: {err})")

    extension = CppExtension(
        "munba_kernels._C_cpu",
        ["csrc/munba_cpu.cpp"],
        extra_compile_args=COMPILE_ARGS,
        extra_link_args=LINK_ARGS,
    )
    return dict(ext_modules=[extension], cmdclass={"build_ext": OptionalBuildExtension})


def _skip(reason: str) -> None:
    print(
        f"WARNING: munba_kernels C++ CPU backend not built: {reason}. "
        "The package works without it (backend='auto' uses the plain-torch reference).",
        file=sys.stderr,
    )


setup(**_build_config())
