"""The base classes of every error the user can act on, and whose fault each is, so each face
maps them once.

A `UserError` means bad input or a setup someone can fix (a damaged video, weights that name no
file, an engine this machine cannot run); its message is one line meant for whoever runs the
program. The CLI turns every one into that line and exit code 2. The API answers only a
`ClientError` (what the client sent is at fault) with its message, as a 4xx problem; any other
`UserError` there is the operator's setup, not the client's doing, so the client gets a plain
5xx and the message (which may name server paths) goes to the server's log. Every other
exception is a bug or a fault of the machine. Torch-free: the faces catch these without loading
the network.
"""

from __future__ import annotations


class UserError(Exception):
    """Something asked for or set up cannot be done; the message says why and how to fix it."""


class ClientError(UserError):
    """What the client sent cannot be used (a damaged or refused video): the API's client sees the
    message, so it must name nothing but what the client sent."""


__all__ = ["ClientError", "UserError"]
