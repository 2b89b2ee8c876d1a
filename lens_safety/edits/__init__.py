"""Activation edits: the ``Edit`` (the one edit API), LEACE, and the math run inside a trace."""
