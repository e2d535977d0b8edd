"""The one base class of every error lmaczs reports to a user (no heavy imports here)."""
from __future__ import annotations


class LmaczsError(Exception):
    """An error whose message is meant for the user and names the fix; the CLI prints it
    without a traceback and exits 1."""
