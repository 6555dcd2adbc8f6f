"""Plain-data YAML for recipes: a safe loader with line numbers, dotted overrides, readable errors.

Recipes are data: only ``yaml.SafeLoader`` tags are accepted (a ``!!python/...`` tag is an error), keys
may not repeat, and ``1e-4`` reads as a float (YAML 1.2) rather than a string.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import pydantic
import yaml

__all__ = ["RecipeError", "RecipeValidationError", "parse_yaml", "apply_overrides", "parse_value"]

_LOCATED = re.compile(r"^([\w.]+): (.*)$")
_FLOAT_12 = re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$")


@dataclass(frozen=True)
class RecipeError:
    """One problem in a recipe: where (dotted YAML path and line) and what, with a suggestion."""

    path: str
    message: str
    suggestion: str | None = None
    line: int | None = None
    file: str | None = None

    def __str__(self) -> str:
        return self.format()

    def format(self, show_file: bool = True) -> str:
        """Return ``file:line: path: message (did you mean ...?)``, optionally without the file."""
        if show_file and self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        else:
            where = f"line {self.line}: " if self.line else ""
        hint = f" (did you mean '{self.suggestion}'?)" if self.suggestion else ""
        return f"{where}{self.path or '<recipe>'}: {self.message}{hint}"


class RecipeValidationError(ValueError):
    """A recipe (file or overrides) is invalid; ``errors`` lists every problem."""

    def __init__(self, errors: Sequence[RecipeError], source: str | None = None):
        self.errors = list(errors)
        self.source = source
        head = f"recipe {source} is invalid" if source else "recipe is invalid"
        lines = "; ".join(error.format(show_file=error.file != source) for error in self.errors)
        super().__init__(f"{head} ({len(self.errors)} error{'s' * (len(self.errors) != 1)}): {lines}")


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that refuses repeated keys and reads YAML 1.2 floats such as ``1e-4``."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def parse_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """Parse recipe text safely.

    Returns:
        The data and the composed node tree (for line numbers).

    Raises:
        yaml.YAMLError: Malformed YAML, a repeated key or a tag that would build a Python object.
    """
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return data, node


def yaml_error(error: yaml.YAMLError, file: str | None) -> RecipeError:
    """Turn a YAML parse error into a RecipeError with its line."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if "could not determine a constructor" in problem:
        problem = f"{problem.split('for the tag')[-1].strip()} tags are not allowed: recipes are plain data"
    return RecipeError("", f"invalid YAML: {problem}", line=mark.line + 1 if mark else None, file=file)


def line_of(node: yaml.Node | None, parts: Sequence[str]) -> int | None:
    """Return the 1-based line of the deepest existing node along a dotted path."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for depth, part in enumerate(parts):
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if str(getattr(k, "value", "")) == part), None)
            key = next((k for k, v in node.value if str(getattr(k, "value", "")) == part), None)
            if match is None:  # not in the file (a default or an override): its section's line, if any
                return line if depth else None
            line, node = key.start_mark.line + 1, match
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def suggest(word: object, candidates: Sequence[str]) -> str | None:
    """Return the closest candidate to ``word``, if any is close."""
    matches = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return matches[0] if matches else None


# -- walking the schema types along a path ------------------------------------------------------------


def _strip(tp: Any) -> Any:
    """Drop Annotated and None from a type; return the remaining type or a tuple of union members."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (Union, types.UnionType):
        members = [_strip(m) for m in typing.get_args(tp) if m is not type(None)]
        return members[0] if len(members) == 1 else tuple(members)
    return tp


def _fields(tp: Any) -> dict[str, Any] | None:
    """Field name -> annotation of a pydantic model or dataclass; None for free-form types."""
    if isinstance(tp, type) and issubclass(tp, pydantic.BaseModel):
        return {name: info.annotation for name, info in tp.model_fields.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(tp) if f.init}
    return None


def _tag_field(members: tuple) -> tuple[str, dict[str, Any]] | None:
    """For a union of structured types sharing a Literal field, return (field, tag -> member)."""
    all_fields = [_fields(m) for m in members]
    if any(f is None for f in all_fields):
        return None
    for name in all_fields[0]:
        tags: dict[str, Any] = {}
        for member, fields in zip(members, all_fields, strict=True):
            annotation = _strip(fields.get(name, Any))
            if typing.get_origin(annotation) is not Literal:
                break
            tags.update({str(tag): member for tag in typing.get_args(annotation)})
        else:
            return name, tags
    return None


def _choose(tp: Any, value: Any, loc_next: Any = None) -> tuple[Any, bool]:
    """Resolve a union by its tag; return (type, whether loc_next was the tag and is consumed)."""
    tp = _strip(tp)
    if not isinstance(tp, tuple):
        return tp, False
    tagged = _tag_field(tp)
    if tagged is None:
        return Any, False
    name, tags = tagged
    if loc_next is not None and str(loc_next) in tags:
        return tags[str(loc_next)], True
    if isinstance(value, dict) and str(value.get(name)) in tags:
        return tags[str(value[name])], False
    return tp, False


def _child(tp: Any, key: Any) -> Any:
    """Type of ``key`` inside a (resolved, non-union) type."""
    fields = _fields(tp)
    if fields is not None:
        return fields.get(str(key), Any)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple, Sequence) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return Any


def _is_section(tp: Any) -> bool:
    """Whether a type holds keys or items (a model, dataclass, union of them, dict, list or Any)."""
    if tp is Any or isinstance(tp, tuple) or _fields(tp) is not None:
        return True
    return typing.get_origin(tp) in (dict, list, tuple, Sequence)


def _field_names(tp: Any) -> list[str] | None:
    if isinstance(tp, tuple):  # an unresolved union: any key, validation reports the missing tag
        return None
    fields = _fields(tp)
    return list(fields) if fields is not None else None


def _walk(model: type, data: Any, loc: Sequence[Any]) -> tuple[list[str], Any, Any]:
    """Follow a pydantic error location; return (YAML path parts, type there, type of the parent)."""
    parts: list[str] = []
    tp, parent, value = model, None, data
    index = 0
    while index < len(loc):
        tp, consumed = _choose(tp, value, loc[index])
        if consumed:
            index += 1
            continue
        element = loc[index]
        parent, tp = tp, _child(tp, element)
        if isinstance(value, dict):
            value = value.get(element)
        elif isinstance(value, list) and isinstance(element, int) and element < len(value):
            value = value[element]
        else:
            value = None
        parts.append(str(element))
        index += 1
    resolved, _ = _choose(tp, value)
    return parts, resolved, parent


def translate_errors(
    error: pydantic.ValidationError, model: type, data: Any, node: yaml.Node | None, file: str | None
) -> list[RecipeError]:
    """Turn pydantic's errors into RecipeErrors with YAML paths, lines and closest-key suggestions."""
    results: list[RecipeError] = []
    for item in error.errors():
        parts, tp, parent = _walk(model, data, item["loc"])
        kind, message, suggestion = item["type"], item["msg"], None
        if kind in ("extra_forbidden", "unexpected_keyword_argument"):
            names = _field_names(_choose(parent, None)[0]) or []
            message = f"unknown key '{parts[-1]}'" if parts else "unknown key"
            suggestion = suggest(parts[-1], names) if parts else None
            if names and suggestion is None:
                message += f" (valid keys: {', '.join(names)})"
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            members = _strip(tp) if isinstance(_strip(tp), tuple) else ()
            tagged = _tag_field(members) if members else None
            tag_name, tags = tagged if tagged else ("method", {})
            parts = [*parts, tag_name]
            if kind == "union_tag_invalid":
                tag = item.get("ctx", {}).get("tag")
                message = f"unknown {tag_name} '{tag}' (choose one of: {', '.join(tags)})"
                suggestion = suggest(tag, list(tags))
            else:
                message = f"required key missing (one of: {', '.join(tags)})"
        elif kind in ("missing", "missing_argument"):
            message = "required key missing"
        elif kind == "literal_error" and typing.get_origin(tp) is Literal:
            suggestion = suggest(item.get("input"), [str(a) for a in typing.get_args(tp)])
        elif kind.startswith("value_error") or kind == "assertion_error":
            message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
            located = [_LOCATED.match(line) for line in message.splitlines()]
            if located and all(located):  # a model validator's "path: message" lines, one error each
                for match in located:
                    sub = match.group(1).split(".")
                    results.append(
                        RecipeError(match.group(1), match.group(2), None, line_of(node, sub), file)
                    )
                continue
        key = (".".join(parts), message)
        if any((r.path, r.message) == key for r in results):
            continue  # a plain union reports the same problem once per member
        results.append(RecipeError(key[0], message, suggestion, line_of(node, parts), file))
    return results


# -- overrides --------------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """Parse an override value as YAML (so ``1e-4``, ``[a, b]``, ``null`` and ``true`` work)."""
    if not text.strip():
        return ""
    try:
        data, _ = parse_yaml(text)
    except yaml.YAMLError:
        return text  # a plain string the YAML grammar dislikes, e.g. "a: b: c"
    return data


def apply_overrides(data: Any, overrides: Sequence[str], model: type | None = None) -> dict:
    """Return a copy of recipe data with ``dotted.key=value`` overrides applied.

    Args:
        data: Recipe data (a dict) as loaded from YAML.
        overrides: Items such as ``"stages.0.train.lr=1e-4"`` or ``"data.fraction=0.1"``.
        model: Schema the keys are checked against (the Recipe); missing sections are created.

    Raises:
        RecipeValidationError: An item is not KEY=VALUE, names an unknown key or an index out of range.
    """
    result = copy.deepcopy(data) if isinstance(data, dict) else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeValidationError([RecipeError(item, "an override must look like KEY=VALUE")])
        _set(result, key.split("."), parse_value(raw), model if model is not None else Any)
    return result


def _fail(path: list[str], message: str, suggestion: str | None = None) -> RecipeValidationError:
    return RecipeValidationError([RecipeError(".".join(path), message, suggestion)])


def _set(data: dict, parts: list[str], value: Any, tp: Any) -> None:
    node: Any = data
    for position, part in enumerate(parts):
        here, last = parts[: position + 1], position == len(parts) - 1
        tp, _ = _choose(tp, node)
        if isinstance(node, list):
            if not re.fullmatch(r"\d+", part):
                raise _fail(here, f"'{'.'.join(parts[:position]) or '<recipe>'}' is a list: use an index")
            index = int(part)
            if index >= len(node):
                raise _fail(here, f"index {index} is out of range: the list has {len(node)} items")
            tp = _child(tp, index)
            if last:
                node[index] = value
            node = node[index]
        elif isinstance(node, dict):
            names = _field_names(tp)
            if names is not None and part not in names:
                raise _fail(here, f"unknown key '{part}'", suggest(part, names))
            tp = _child(tp, part)
            if last:
                node[part] = value
            elif node.get(part) is None:
                if not _is_section(_choose(tp, None)[0]):
                    raise _fail(
                        here,
                        f"'{'.'.join(here)}' is a value, not a section: set it with {'.'.join(here)}=...",
                    )
                node[part] = {}
            node = node[part]
        else:
            raise _fail(
                here, f"cannot set '{part}': '{'.'.join(parts[:position])}' is a value, not a section"
            )
