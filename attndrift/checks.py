"""Checks of user-supplied values: one ValueError that names the value and its allowed range.

Every config dataclass validates its fields with :func:`number` in ``__post_init__``, so the
API, the command line and saved settings reject NaN, inf and out-of-range values the same way.
"""

import math
import string
import typing
import unicodedata


def number(
    name: str,
    value: object,
    *,
    low: int | float | None = None,
    high: int | float | None = None,
    above: bool = False,
    integer: bool = False,
) -> None:
    """Raise a ValueError unless ``value`` is a finite number in the allowed range.

    Args:
        name: the option's name, as the user wrote it (e.g. ``"clamp_norm_factor"``).
        value: the value to check (``bool`` is not a number here).
        low: the smallest allowed value (``None``: no lower bound).
        high: the largest allowed value (``None``: no upper bound).
        above: ``value`` must be strictly greater than ``low``.
        integer: ``value`` must be an ``int``.
    """
    kind = "an integer" if integer else "a finite number"
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if above else '>='} {low:g}")
    if high is not None:
        bounds.append(f"<= {high:g}")
    allowed = f"{kind} {' and '.join(bounds)}".strip()
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    ok = ok and not isinstance(value, bool)
    if ok and not integer:
        ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if above else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def choice(name: str, value: object, allowed: tuple) -> None:
    """Raise a ValueError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def option(name: str, value: object, kind: object) -> None:
    """Raise a ValueError unless ``value`` is one of the strings of the ``Literal`` ``kind``.

    Options are typed ``str`` where users give them (config fields, the entry points' keyword
    arguments) and checked here against their ``Literal``, the one list of their values: a
    ``Literal`` annotation there would let the test-time type checker (jaxtyping + beartype)
    refuse a bad value with its own TypeCheckError before this one-line ValueError, which is
    what users see and the bad-input tests check.
    """
    choice(name, value, typing.get_args(kind))


def layers(editor: str, value: object) -> None:
    """Raise a ValueError unless ``value`` is a non-empty tuple (or list) of layer indices >= 0
    in ascending order without repeats (the layer range of a batch editor)."""
    if not isinstance(value, tuple | list) or not value:
        raise ValueError(f"{editor} layers must be a non-empty ascending tuple, got {value!r}")
    for layer in value:
        number(f"{editor} layer", layer, low=0, integer=True)
    if list(value) != sorted(set(value)):
        raise ValueError(f"{editor} layers must be ascending without repeats, got {value}")


def optional_steps(name: str, value: object) -> None:
    """Raise a ValueError unless ``value`` is None or a step count >= 1."""
    if value is not None:
        number(name, value, low=1, integer=True)


def visible(text: str) -> str:
    """``text`` without surrounding whitespace and without format characters (Unicode
    category Cf: zero-width spaces and joiners, direction marks, the BOM): what is left to
    read. A target or subject whose visible text is empty is refused."""
    return "".join(c for c in text if unicodedata.category(c) != "Cf").strip()


def template_problem(text: str) -> str | None:
    """What is wrong with a prompt template, or None: it needs exactly one ``{}`` (the
    subject), no other field (``{city}``, ``{0}``, a format spec), and balanced braces (a
    literal brace is written ``{{`` or ``}}``)."""
    try:
        fields = [f for f in string.Formatter().parse(text) if f[1] is not None]
    except ValueError as e:
        return f"is not a template ({e}): write a literal brace as '{{{{' or '}}}}'"
    named = [name for _, name, _, _ in fields if name != ""]
    if named:
        return f"has the field {{{named[0]}}}: only '{{}}' (the subject) is allowed"
    if any(spec or conversion for _, _, spec, conversion in fields):
        return "'{}' takes no format spec or conversion"
    if not fields:
        return "template has no '{}' for the subject"
    if len(fields) > 1:
        return f"has {len(fields)} '{{}}': expected exactly one, for the subject"
    return None
