"""Moved to `lowbit.float8.config`; this path is kept for one release."""

from lowbit._deprecated import alias

alias(__name__, "lowbit.float8.config")
