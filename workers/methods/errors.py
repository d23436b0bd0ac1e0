"""The one error a method raises for what the user can fix (model, layer or parameters).

Its own module so that the modules the method base needs (``compat``, ``reshape``, ``layers``)
can raise it without importing ``base``, and ``base`` can import them at the top.
"""

from __future__ import annotations


class MethodError(ValueError):
    """A method cannot run on this model or with these parameters (the message says why)."""
