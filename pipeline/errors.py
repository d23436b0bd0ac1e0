"""The real reason a failure happened, in one line, out of Ray's wrappers.

Ray re-raises a remote error as ``RayTaskError(<type>)`` holding the original in ``.cause``;
Ray Data wraps a failing map function in ``UserCodeException`` whose message is a retry hint
("UDF failed to process a data block ... To change retry attempts ...") and whose original
exception survives only as text in the remote traceback. :func:`root_cause` follows the object
chain as far as it goes, then reads the innermost exception line of that traceback text.
"""

from __future__ import annotations

import re

# separators Python prints between the exceptions of a chain, innermost first
_CHAIN_SEPARATORS = re.compile(
    r"\n\s*(?:The above exception was the direct cause of the following exception:"
    r"|During handling of the above exception, another exception occurred:)\s*\n"
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:\([\w.]+\))?)(?::\s?(.*))?$")
# lines of Ray's own messages that are advice, never the reason
_HINTS = (
    "UDF failed to process a data block", "Failed to apply UDF transform after",
    "To change retry attempts", "To ignore this exception", "Dataset execution will now abort",
    "if you believe this to be transient",
)
MAX_CHARS = 500


def _ray_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(RayTaskError, Ray Data's cause marker); empty without Ray."""
    try:
        from ray.exceptions import RayTaskError
    except ImportError:
        return (), ()
    try:
        from ray.data.exceptions import SystemException
    except ImportError:
        return (RayTaskError,), ()
    return (RayTaskError,), (SystemException,)


def type_name(err: BaseException) -> str:
    """``tarfile.ReadError``; builtins without a module (``KeyError``), as tracebacks print."""
    cls = type(err)
    module = cls.__module__
    return cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in _ANSI.sub("", text).splitlines()]
    kept = [ln for ln in lines if ln and not any(h in ln for h in _HINTS)]
    line = " ".join(kept)
    return line if len(line) <= MAX_CHARS else line[: MAX_CHARS - 3] + "..."


def _innermost_from_traceback(text: str) -> str | None:
    """The innermost ``Type: message`` of a printed (remote) traceback, or None."""
    text = _ANSI.sub("", text)
    first = _CHAIN_SEPARATORS.split(text)[0]
    lines = first.splitlines()
    frames = [i for i, ln in enumerate(lines) if ln.startswith(("  File ", "Traceback "))]
    if not frames:
        return None
    i = frames[-1] + 1
    while i < len(lines) and (lines[i].startswith((" ", "\t")) or not lines[i].strip()):
        i += 1  # the frame's code line and its ^^^ / ~~~ markers
    if i >= len(lines):
        return None
    match = _EXC_LINE.match(lines[i].strip())
    if not match:
        return None
    name, first_msg = match.group(1), match.group(2) or ""
    message = _one_line("\n".join([first_msg, *lines[i + 1:]]))
    return f"{name}: {message}" if message else name


def chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions behind it, outermost first: RayTaskError ``.cause``, else
    ``__cause__``, else an unsuppressed ``__context__``. A Ray Data ``SystemException`` marker
    (raised ``from`` for internal errors, empty) is not followed."""
    task_errors, markers = _ray_types()
    out = [err]
    while True:
        current, nxt = out[-1], None
        if task_errors and isinstance(current, task_errors):
            nxt = getattr(current, "cause", None)
        if nxt is None and current.__cause__ is not None:
            nxt = current.__cause__
        if nxt is None and current.__context__ is not None and not current.__suppress_context__:
            nxt = current.__context__
        if nxt is None or any(nxt is e for e in out) or (markers and isinstance(nxt, markers)):
            return out
        out.append(nxt)


def root_cause(err: BaseException) -> str:
    """``ExcType: message`` of the innermost real error, in one line, without Ray's hints.

    >>> root_cause(ValueError("bad"))
    'ValueError: bad'
    """
    errors = chain(err)
    # a remote error's traceback text holds its whole remote chain, which unpickling loses
    # (Ray Data's UserCodeException keeps only a retry hint, a task's exception its __cause__)
    for e in errors:
        if _is_ray_error(e):
            found = _innermost_from_traceback(str(e))
            if found:
                return found
    inner = errors[-1]
    message = _one_line(str(inner))
    return f"{type_name(inner)}: {message}" if message else type_name(inner)


def _is_ray_error(err: BaseException) -> bool:
    return type(err).__module__.startswith("ray.")
