"""The bench harnesses behind ``diga bench``; the modules live in the repository's top-level
benchmarks/ (``diga_fast.with_checkout_folder``)."""

from diga_fast import with_checkout_folder

__path__ = with_checkout_folder(__path__, "benchmarks")
