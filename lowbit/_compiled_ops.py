"""Moved to `lowbit.int8._compiled_ops`; this path is kept for one release."""

from lowbit._deprecated import alias

alias(__name__, "lowbit.int8._compiled_ops")
