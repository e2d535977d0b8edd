"""The one base class of every error lmaczs reports to a user (no heavy imports here)."""
from __future__ import annotations


class LmaczsError(Exception):
    """An error whose message is meant for the user and names the fix; the CLI prints it as
    one line, without a traceback, and exits 2 (the command cannot run as asked)."""


class PathError(LmaczsError):
    """A path cannot be used as asked: not writable, or a file where a folder is wanted."""
