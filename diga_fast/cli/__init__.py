"""The ``diga`` command (Click); the modules live in the repository's top-level cli/
(``diga_fast.with_checkout_folder``)."""

from diga_fast import with_checkout_folder

__path__ = with_checkout_folder(__path__, "cli")
