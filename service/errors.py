"""The one base class of every error the user can act on, so each face maps it once.

A `UserError` means bad input or a setup the user can fix (a damaged video, weights that name no
file, an engine this machine cannot run); its message is one line meant for them. The CLI turns
it into that line and exit code 2, the API into a 4xx problem. Every other exception is a bug
or a fault of the machine, and is reported as such. Torch-free: the faces catch it without
loading the network.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user asked for or set up cannot be done; the message says why and how to fix it."""


__all__ = ["UserError"]
