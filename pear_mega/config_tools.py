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
        if text.strip().startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                # not JSON (e.g. [-0.1,nan]): the items between the brackets, each parsed by its type
                inner = text.strip()
                if not inner.endswith("]"):
                    raise ValueError(f"override {key}={text!r}: a list needs a closing ']'") from None
                items = [t.strip() for t in inner[1:-1].split(",") if t.strip()]
            if not isinstance(items, list):
                raise ValueError(f"override {key}={text!r}: not a list")
        else:
            items = [t for t in text.split(",") if t]
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
        ValueError: an override without ``=``, an unknown key (the known ones are listed; a key a
            config class lists in its ``moved_keys`` class variable, ``{old name: new dotted path
            below the class}``, names its new place), or a value of the wrong type.
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
        moved = getattr(type(node), "moved_keys", {}).get(name)
        if moved is not None:  # e.g. rollout.max_model_len → rollout.engine.max_model_len
            prefix = full_key[: len(full_key) - len(".".join(path))]
            raise ValueError(f"override {full_key}: the key moved to {prefix}{moved}")
        raise ValueError(f"override {full_key}: unknown key {name!r}; known: {sorted(fields)}")
    hints = typing.get_type_hints(type(node))
    if len(path) == 1:
        value = _parse(text, hints[name], full_key)
    else:
        value = _set(getattr(node, name), path[1:], text, full_key)
    # dataclasses.replace re-runs __post_init__, so validation covers the new value.
    try:
        return dataclasses.replace(node, **{name: value})
    except ValueError as exc:
        if len(path) == 1 and full_key not in str(exc):
            # a config that does not know where it is nested (e.g. pear_mega.engine.EngineConfig as
            # rollout.engine) names its field alone: say which key was given
            raise ValueError(f"override {full_key}={text}: {exc}") from None
        raise


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

    Options and overrides may come in any order. A bad config (or bad data found while the
    trainer is built: ``ValueError`` naming the key, or file / row / field) is printed alone and
    exits with status 2; a run that stops itself (``pear_mega.optim.TrainingStopped``: non-finite
    steps) prints why and exits with status 1. ``--metrics-out`` gets one JSON line per logged
    step as the run goes.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help=f"one of: {', '.join(registry.names())}")
    parser.add_argument("--list-recipes", action="store_true", help="print the recipe names and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--metrics-out", default="", help="write the per-step metrics here as JSON lines")
    parser.add_argument("overrides", nargs="*", help=f"dotted.key=value overrides, e.g. {example_override}")
    args = parser.parse_intermixed_args(argv)
    if args.list_recipes:
        print("\n".join(registry.names()))
        return
    if not args.recipe:
        parser.error("--recipe is required")

    def fail(exc: Exception, status: int) -> None:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(status)

    try:
        cfg = registry.build(args.recipe, args.overrides)
        if args.print_config:
            print(json.dumps(to_dict(cfg), indent=2))
            return
        validate = getattr(cfg, "validate_run", None)
        if validate is not None:
            validate()
    except ValueError as exc:
        fail(exc, 2)

    from pear_mega.optim import TrainingStopped
    from pear_mega.platform import quiet_fallback_warnings

    quiet_fallback_warnings()
    try:
        trainer = make_trainer(cfg)
    except ValueError as exc:
        fail(exc, 2)
    try:
        if args.metrics_out:
            _stream_metrics(trainer.metrics, args.metrics_out)
        trainer.train()
    except TrainingStopped as exc:
        fail(exc, 1)
    finally:
        trainer.close()


def _stream_metrics(writer, path: str) -> None:
    """Append every record ``writer.log`` keeps to ``path`` (JSON lines) as soon as it is logged."""
    from pathlib import Path

    if writer.rank != 0:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")
    log = writer.log

    def log_and_write(step, scalars, console_keys=()):
        before = len(writer.history)
        log(step, scalars, console_keys)
        with open(out, "a") as f:
            f.writelines(json.dumps(record) + "\n" for record in writer.history[before:])

    writer.log = log_and_write
