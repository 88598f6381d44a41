"""Named recipes and ``dotted.key=value`` overrides for nested dataclass configs.

A recipe is a plain function returning a config (``debug_sft()``); the command line picks one by
name and overrides single fields: ``python -m pear_mega.train_sft --recipe debug_sft
train.steps=20 pear.level=none optim.lr=3e-4``. Values are parsed by the field's annotated type,
and ``__post_init__`` validation runs again on every dataclass that was touched, so an override
cannot produce an invalid config.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from typing import Any


def _parse(text: str, annotation: Any, key: str) -> Any:
    """Parse ``text`` as a value of type ``annotation`` (str, int, float, bool, tuples, Optional)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if type(None) in args and text.lower() in ("none", "null"):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _parse(text, arg, key)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(f"override {key}={text!r}: not any of {args}: {errors}")
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        for choice in choices:
            if str(choice) == text:
                return choice
        raise ValueError(f"override {key}={text!r}: must be one of {choices}")
    if origin in (tuple, list):
        items = json.loads(text) if text.strip().startswith("[") else [t for t in text.split(",") if t]
        args = typing.get_args(annotation)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ValueError(f"override {key}={text!r}: needs {len(args)} values")
            return tuple(_parse(str(v), a, key) for v, a in zip(items, args))
        item_type = args[0] if args else str
        parsed = [_parse(str(v), item_type, key) for v in items]
        return tuple(parsed) if origin is tuple else parsed
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"override {key}={text!r}: not a boolean")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"override {key}={text!r}: not an integer") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"override {key}={text!r}: not a number") from None
    if annotation is str or annotation is Any:
        return text
    raise ValueError(f"override {key}: fields of type {annotation} cannot be set from the command line")


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """Return a copy of ``config`` with ``dotted.key=value`` overrides applied and re-validated.

    Raises:
        ValueError: an override without ``=``, an unknown key (the known ones are listed), or a
            value of the wrong type.
    """
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected dotted.key=value")
        key, text = item.split("=", 1)
        config = _set(config, key.split("."), text, key)
    return config


def _set(node: Any, path: list[str], text: str, full_key: str) -> Any:
    if not dataclasses.is_dataclass(node):
        raise ValueError(f"override {full_key}: {type(node).__name__} has no sub-fields")
    fields = {f.name: f for f in dataclasses.fields(node)}
    name = path[0]
    if name not in fields:
        raise ValueError(f"override {full_key}: unknown key {name!r}; known: {sorted(fields)}")
    hints = typing.get_type_hints(type(node))
    if len(path) == 1:
        value = _parse(text, hints[name], full_key)
    else:
        value = _set(getattr(node, name), path[1:], text, full_key)
    # dataclasses.replace re-runs __post_init__, so validation covers the new value.
    return dataclasses.replace(node, **{name: value})


def to_dict(config: Any) -> dict:
    """The config as plain JSON-able data (for logs and checkpoint metadata)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


class RecipeRegistry:
    """Name → recipe function; ``@registry.register`` on a function returning a config."""

    def __init__(self, kind: str):
        self.kind = kind
        self._recipes: dict[str, Callable[[], Any]] = {}

    def register(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        self._recipes[fn.__name__] = fn
        return fn

    def names(self) -> list[str]:
        return sorted(self._recipes)

    def build(self, name: str, overrides: list[str] | None = None) -> Any:
        if name not in self._recipes:
            raise ValueError(f"unknown {self.kind} recipe {name!r}; known: {', '.join(self.names())}")
        return apply_overrides(self._recipes[name](), overrides or [])


def run_recipe_cli(doc: str, registry: RecipeRegistry, make_trainer: Callable[[Any], Any],
                   argv: list[str] | None = None, example_override: str = "optim.lr=1e-4") -> None:
    """The shared command line of the trainers: ``--recipe NAME [dotted.key=value ...]``.

    ``make_trainer(config)`` returns an object with ``train()``, ``close()`` and ``metrics``
    (a ``MetricsWriter``); it is imported lazily by the caller so ``--help`` stays fast.
    """
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help=f"one of: {', '.join(registry.names())}")
    parser.add_argument("--list-recipes", action="store_true", help="print the recipe names and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--metrics-out", default="", help="write the per-step metrics here as JSON lines")
    parser.add_argument("overrides", nargs="*", help=f"dotted.key=value overrides, e.g. {example_override}")
    args = parser.parse_args(argv)
    if args.list_recipes:
        print("\n".join(registry.names()))
        return
    if not args.recipe:
        parser.error("--recipe is required")
    cfg = registry.build(args.recipe, args.overrides)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return

    from pear_mega.platform import quiet_fallback_warnings

    quiet_fallback_warnings()
    trainer = make_trainer(cfg)
    try:
        trainer.train()
        if args.metrics_out:
            trainer.metrics.dump(args.metrics_out)
    finally:
        trainer.close()
