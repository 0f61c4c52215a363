"""The one ``--set`` grammar of every command: ``KEY=VALUE`` items.

- ``<method>.<param>=VALUE`` sets a parameter of a registered method (``steer.lambda_min=0.7``);
  the trainer also accepts ``method.<param>`` for the parameter of its own method;
- ``<section>.<field>=VALUE`` or ``<field>=VALUE`` sets a config key (``optim.lr=1e-4``, ``seed=3``),
  for commands that have a config (the trainer).

Values are untyped text until the receiving field says otherwise (:func:`parse_value`).
"""

from __future__ import annotations

from typing import Any, Iterable

from entropy_lens.methods import get_method, list_methods


def parse_value(text: str) -> Any:
    """Untyped ``--set`` value: true/false, none/null, int, float (incl. inf), else the string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text.strip())
        except ValueError:
            pass
    return text


def parse_set_items(items: Iterable[str]) -> dict[str, str]:
    """``["a.b=v", ...]`` → ``{"a.b": "v"}`` (later items win); a malformed item is a ValueError."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE (e.g. steer.lambda_min=0.7 or optim.lr=1e-4), got {item!r}")
        out[key.strip()] = value.strip()
    return out


def split_method_keys(
    items: dict[str, Any], methods: Iterable[str], own: str | None = None
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Split parsed items into method parameters ``{method: {param: value}}`` and config keys.

    A key ``<m>.<param>`` whose head is a registered method belongs to method ``m``, which must be
    one of ``methods`` (the methods the command runs). ``own``: the method of a run that has one
    (the trainer): ``method.<param>`` then means ``<own>.<param>``. String values are parsed by
    :func:`parse_value`; every other key is returned as a config key, unchanged.
    """
    methods = list(methods)
    registered = set(list_methods())
    params: dict[str, dict[str, Any]] = {}
    config: dict[str, Any] = {}
    for key, value in items.items():
        head, dot, rest = key.partition(".")
        if dot and head == "method" and own is not None:
            head = own
        if not (dot and head in registered):
            config[key] = value
            continue
        if not rest:
            raise ValueError(f"--set {key}: expected {head}.PARAM=VALUE")
        get_method(head)
        if head not in methods:
            raise ValueError(f"--set {key}: method {head!r} is not being run (running: {', '.join(methods)}; add it with -m {head})")
        params.setdefault(head, {})[rest] = parse_value(value) if isinstance(value, str) else value
    return params, config
