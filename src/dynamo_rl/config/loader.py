"""Load a recipe from YAML, apply dotted overrides, validate, and explain errors.

Merge order: schema defaults ← YAML file ← overrides in the order given. An override is
``a.b.c=VALUE`` (the key must exist in the schema) or ``+a.b.c=VALUE`` (the same; the
``+`` is accepted for Hydra habits and also creates intermediate sections that are null).
``VALUE`` is parsed as YAML (``3``, ``1e-3``, ``true``, ``null``, ``[1, 2]``, ``text``).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from dynamo_rl.config.schema import Recipe


class ConfigError(ValueError):
    """A recipe could not be read or validated; the message names the key and the fix."""


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read one YAML mapping. Raises :class:`ConfigError` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"recipe {str(path)!r} is a directory; give a YAML file, e.g. examples/grpo_tiny.yaml")
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} not found; give a recipe file, e.g. examples/grpo_tiny.yaml "
                          "(the examples/ folder of the repository holds the others)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}); "
                          "is it really a YAML file?") from None
    except OSError as e:
        raise ConfigError(f"recipe {str(path)!r} cannot be read ({e.strerror or e})") from None
    if data is None:
        raise ConfigError(f"recipe {str(path)!r} is empty; start from examples/grpo_tiny.yaml "
                          "(every key has a default, but a recipe names at least its task)")
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "recipe") -> dict[str, Any]:
    """Return ``data`` with each ``[+]dotted.key=value`` override applied (new dict).

    Raises:
        ConfigError: an override without ``=`` or with an empty key, a value OmegaConf
            cannot hold (a YAML date), a ``${...}`` that names no key; ``source`` (the recipe
            file) or the override is named.
    """
    try:
        cfg = OmegaConf.create(data)
    except OmegaConfBaseException as e:  # e.g. a YAML date, which OmegaConf cannot hold
        raise ConfigError(f"{source}: {_omegaconf_message(e)}; quote the value to make it a string") from None
    for item in overrides:
        if item.startswith("-"):  # an unknown --flag that the command line passed on as an argument
            raise ConfigError(f"no such option {item!r} (see the command's --help); overrides look like "
                              "section.key=value (e.g. grpo.num_steps=20)")
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("+")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. grpo.num_steps=20)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        try:
            OmegaConf.update(cfg, key, value, force_add=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r}: {_omegaconf_message(e)}") from None
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as e:  # ${...} that names nothing
        item = override_keys(overrides).get(str(getattr(e, "full_key", "")))
        where = f"override {item!r}" if item else source
        raise ConfigError(f"{where}: {_omegaconf_message(e)}; `${{a.b}}` may only name another key of the "
                          "recipe (write the value instead)") from None


def _omegaconf_message(e: Exception) -> str:
    """OmegaConf's message without its multi-line 'full_key: ... object_type=...' trailer."""
    lines = str(e).strip().splitlines()
    key = getattr(e, "full_key", None)
    return (f"{key}: " if key else "") + (lines[0] if lines else type(e).__name__)


def override_keys(overrides: list[str]) -> dict[str, str]:
    """``{dotted.key: override text}`` of ``[+]dotted.key=value`` overrides (the last wins)."""
    return {item.partition("=")[0].strip().lstrip("+"): item for item in overrides}


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def format_validation_error(err: ValidationError, source: str, model: type[BaseModel] = Recipe,
                            overridden: dict[str, str] | None = None) -> str:
    """One line per problem: ``source: dotted.key: what is wrong (and the likely fix)``.

    ``overridden`` maps dotted keys set on the command line to their override text; a
    problem at (or under) such a key names the override instead of ``source``."""
    lines: list[str] = []
    union: dict[tuple[str, str], int] = {}  # (where, key) → index in lines of a union's first member's error
    for e in err.errors():
        # a union's members tag the loc (``literal['a','b']``, ``list[...]``): one problem, one line
        tagged = any(isinstance(p, str) and "[" in p for p in e["loc"])
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and "[" in p))
        key = ".".join(str(p) for p in loc) or "(top level)"
        # an override at this key, above it, or below it (grpoo.num_steps=3 → unknown `grpoo`)
        hits = [text for k, text in (overridden or {}).items()
                if k == key or key.startswith(k + ".") or k.startswith(key + ".")]
        where = f"override {hits[-1]!r}" if hits else source
        if e["type"] == "extra_forbidden":
            known = _known_keys(model, loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else (
                f"; known keys here: {', '.join(known)}" if known else "")
            lines.append(f"{where}: {key}: unknown key{hint}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = e["msg"].removeprefix("Value error, ")
            if msg.startswith(key + ": "):  # our validators name the key themselves
                msg = msg[len(key) + 2:]
            if tagged and (where, key) in union:  # another member of the same union: "or ..."
                i = union[(where, key)]
                lines[i] = lines[i].removesuffix(got_s) + f"; or {msg[0].lower()}{msg[1:]}{got_s}"
                continue
            if tagged:
                union[(where, key)] = len(lines)
            lines.append(f"{where}: {key}: {msg}{got_s}")
    return "\n".join(lines)


def load_recipe(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe.

    Args:
        path: YAML file, or None for the schema defaults.
        overrides: ``["grpo.num_steps=20", "+generation.dynamo.dgd_name=x"]``.
    Returns:
        A validated :class:`Recipe`.
    Raises:
        ConfigError: unreadable file, malformed override, unknown key (with a suggestion),
            or a value of the wrong type; the message names the key.
    """
    source = str(path) if path is not None else "recipe"
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [], source)
    overridden = override_keys(overrides or [])
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, overridden=overridden)) from None
