"""Command groups of the ``astromer`` CLI: each module defines ``register(parser)`` that adds its
sub-commands and sets ``func`` on each, a callable taking the parsed args and returning an exit code."""
