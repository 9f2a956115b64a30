"""A spec file or text -> SweepSpec, or one SpecError line: `FILE:LINE: FIELD.PATH: what is wrong and what
is allowed`. YAML is read with a safe loader that also refuses a key given twice; pydantic's error locations
are mapped back to the YAML lines they came from; grids are checked against the method catalogue."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional, Sequence, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.core.methods import METHODS, Method, StageKind
from orchestrator.core.registry import unknown_name_message
from orchestrator.core.spec import GridSpec, SweepSpec, coerce_hparam, grid_fields, range_bounds


# ---- errors --------------------------------------------------------------------------------------
class SpecError(ValueError):
    """A spec problem, printed as one line: `FILE:LINE: FIELD.PATH: what is wrong and what is allowed`."""

    def __init__(self, file: str, path: str, message: str, line: Optional[int] = None):
        self.file, self.path, self.message, self.line = file, path, message, line
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {path}: {message}" if path else f"{where}: {message}")


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map each field path (tuple of keys/indices) to its 1-based line in the YAML text."""
    lines: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[path + (key.value,)] = key.start_mark.line + 1
                walk(value, path + (key.value,))
                lines[path + (key.value,)] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _line_for(lines: dict[tuple, int], loc: tuple) -> Optional[int]:
    for end in range(len(loc), -1, -1):  # the deepest known ancestor
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _unwrap(annotation):
    """Strip Optional/Annotated to the model classes an annotation may hold."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _unwrap(get_args(annotation)[0])
    if origin is Union:
        return [m for a in get_args(annotation) for m in _unwrap(a)]
    return [annotation]


def _resolve_loc(loc: tuple) -> tuple[tuple, list]:
    """Walk pydantic's error location through the spec's models. Returns the location without
    discriminator tags (pydantic inserts the `kind` value, e.g. model.tiny.hidden_size) and the types
    that may sit at the end of it."""
    candidates: list = [SweepSpec]
    clean: list = []
    for part in loc:
        nxt, is_tag = [], False
        for c in candidates:
            if isinstance(c, type) and issubclass(c, BaseModel):
                if part in c.model_fields:
                    nxt += _unwrap(c.model_fields[part].annotation)
                elif "kind" in c.model_fields and part in get_args(c.model_fields["kind"].annotation):
                    nxt.append(c)
                    is_tag = True
            elif get_origin(c) in (dict, list):
                nxt += _unwrap(get_args(c)[-1])
        if not is_tag:
            clean.append(part)
        candidates = nxt
    return tuple(clean), candidates


def _allowed_fields(candidates: list) -> list[str]:
    return sorted({f for c in candidates if isinstance(c, type) and issubclass(c, BaseModel) for f in c.model_fields})


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _error_from_validation(file: str, exc: ValidationError, lines: dict[tuple, int]) -> SpecError:
    errors = exc.errors()
    # A misspelt key also makes its real name "missing" in the same mapping: report the unknown key, which
    # explains both. Not inside a plain union's branches (their locations name no spec model): there pydantic
    # tries every branch, and its first error is the informative one.
    missing_in = {tuple(e["loc"][:-1]) for e in errors if e["type"] == "missing"}
    first = next((e for e in errors if e["type"] == "extra_forbidden" and tuple(e["loc"][:-1]) in missing_in
                  and _resolve_loc(tuple(e["loc"][:-1]))[1]), errors[0])
    loc, _ = _resolve_loc(tuple(first["loc"]))
    more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        allowed = _allowed_fields(_resolve_loc(tuple(first["loc"])[:-1])[1])
        message = f"unknown field {loc[-1]!r}; allowed: {', '.join(allowed)}"
    elif first["type"] == "missing":
        message = "required field is missing"
    elif first["type"] == "union_tag_invalid":  # e.g. executor: {kind: rey}
        ctx = first["ctx"]
        message = f"unknown kind {ctx['tag']!r}; allowed: {ctx['expected_tags'].replace(chr(39), '')}"
    else:
        message = first["msg"].removeprefix("Value error, ")
        if "input" in first and not isinstance(first["input"], (dict, list)) and first["type"] != "value_error":
            message += f" (got {first['input']!r})"
    return SpecError(file, _format_loc(loc), message + more, _line_for(lines, loc))


def _coerced(file: str, loc: tuple, method: Method, key: str, value, lines):
    try:
        return coerce_hparam(method, key, value)
    except ValidationError as exc:
        raise SpecError(file, _format_loc(loc), f"{exc.errors()[0]['msg']} (got {value!r})",
                        _line_for(lines, loc)) from None


def _known_key(file: str, loc: tuple, method: Method, key: str, fields, lines) -> None:
    if key not in fields:
        raise SpecError(file, _format_loc(loc), unknown_name_message(f"hyperparameter for {method.name}", key,
                                                                     list(fields)), _line_for(lines, loc))


def _no_equal_values(file: str, loc: tuple, typed: list, raw: list, lines) -> None:
    """Values that coerce to the same one (0.1 and "0.1", 1 and 1.0) would be one trial planned twice."""
    for i, value in enumerate(typed):
        if value in typed[:i]:
            first = typed.index(value)
            raise SpecError(file, _format_loc(loc + (i,)), f"the same value as item {first} once read as a number "
                            f"({raw[first]!r} and {raw[i]!r} are both {value!r}): one trial", _line_for(lines, loc + (i,)))


def _check_grid(file: str, where: tuple, method: Method, grid: GridSpec, lines) -> None:
    fields = grid_fields(method)
    for section in ("grid", "zip"):
        for key, values in getattr(grid, section).items():
            loc = where + (section, key)
            _known_key(file, loc, method, key, fields, lines)
            typed = [_coerced(file, loc + (i,), method, key, v, lines) for i, v in enumerate(values)]
            if section == "grid":
                _no_equal_values(file, loc, typed, values, lines)
    rows = list(zip(*[[coerce_hparam(method, k, v) for v in vs] for k, vs in grid.zip.items()]))
    _no_equal_values(file, where + ("zip",), rows, list(zip(*grid.zip.values())), lines)
    for key, search_range in grid.space.items():
        loc = where + ("space", key)
        _known_key(file, loc, method, key, fields, lines)
        for value in range_bounds(search_range):
            _coerced(file, loc, method, key, value, lines)
    given = set(grid.grid) | set(grid.zip) | set(grid.space)
    for key, field in fields.items():
        if field.is_required() and key not in given:
            loc = where + ("grid",)
            raise SpecError(file, _format_loc(loc), f"{method.name} needs {key!r} in grid or zip",
                            _line_for(lines, where))


def _check_methods(file: str, spec: SweepSpec, lines) -> None:
    _check_grid(file, ("stages", "sft"), METHODS["sft"], spec.stages.sft, lines)
    preference = [name for name, m in METHODS.items() if m.kind is StageKind.PREFERENCE]
    for name, grid in spec.stages.methods.items():
        loc = ("stages", "methods", name)
        if name not in preference:
            raise SpecError(file, _format_loc(loc), unknown_name_message("method", name, preference),
                            _line_for(lines, loc))
        _check_grid(file, loc, METHODS[name], grid, lines)


# ---- loading -------------------------------------------------------------------------------------
class _SpecLoader(yaml.SafeLoader):
    """YAML's safe loader (no Python tags, nothing executed), refusing a key given twice in one mapping: plain
    YAML keeps the last one silently, so `beta: [0.1]` further down would replace an earlier grid unseen."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


MAX_SPEC_VALUES = 100_000  # scalars a spec may expand to: anchors and aliases can multiply a few lines


def _expanded_size(root) -> int:
    """How many nodes the YAML holds once every alias is expanded (linear: each node is sized once)."""
    sizes: dict[int, int] = {}

    def size(node) -> int:
        if id(node) not in sizes:
            children = ([v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode)
                        else node.value if isinstance(node, yaml.SequenceNode) else [])
            sizes[id(node)] = 1 + sum(size(child) for child in children)
        return sizes[id(node)]

    return size(root)


def _invalid_yaml(file: str, exc: yaml.YAMLError) -> SpecError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return SpecError(file, "", f"invalid YAML: {problem}", mark.line + 1 if mark else None)


def _read_yaml(text: str, file: str):
    """The YAML's data, refused before it is built when its aliases expand it past MAX_SPEC_VALUES (an alias
    bomb: nine levels of nine aliases are 387 million values)."""
    try:
        root = yaml.compose(text, Loader=_SpecLoader)
        expanded = _expanded_size(root) if root is not None else 0
        if expanded > MAX_SPEC_VALUES:
            raise SpecError(file, "", f"the YAML expands to {expanded:,} values through its anchors and aliases; a "
                                      f"spec holds at most {MAX_SPEC_VALUES:,}")
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise _invalid_yaml(file, exc) from None


def _override(raw: dict, item: str) -> str:
    """Apply one --set FIELD=VALUE to the spec's data (VALUE read as YAML: 8, 1.0e-4, [0.1, 0.3], {kind: tiny});
    the mappings on the way are created when absent. Returns FIELD."""
    field, equals, text = item.partition("=")
    parts = field.strip().split(".")
    if not equals or not all(parts):
        raise SpecError(f"--set {item}", "", "an override is FIELD=VALUE with a dotted field, e.g. "
                                             "training.batch_size=8")
    value = _read_yaml(text, f"--set {item}")  # the file's rules: a safe loader, no alias bomb
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:  # absent, or `section: null` in the file: the override starts the mapping
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[:depth + 1])
            raise SpecError(f"--set {item}", field, f"{where} is a {type(child).__name__} in the spec, not a mapping")
        node = child
    node[parts[-1]] = value
    return ".".join(parts)


def _overridden(error: SpecError, overrides: dict[str, str]) -> SpecError:
    """A spec error in a field some --set gave, inside it, or in the mapping holding it (a union's `kind`) names
    that --set, not the file's line."""
    for field, item in overrides.items():
        if error.path == field or error.path.startswith(field + ".") or field.startswith(error.path + "."):
            return SpecError(f"--set {item}", error.path, error.message)
    return error


def parse_spec(text: str, file: str = "<spec>", overrides: Sequence[str] = ()) -> SweepSpec:
    """A validated spec from YAML text; `overrides` (--set FIELD=VALUE) change fields before validation, so they
    are checked as the YAML is and take part in trial keys like any other setting."""
    raw = _read_yaml(text, file)
    if not isinstance(raw, dict):
        raise SpecError(file, "", f"a sweep spec is a YAML mapping; got {type(raw).__name__}")
    given = {_override(raw, item): item for item in overrides}
    lines = _yaml_lines(text)
    try:
        spec = SweepSpec.model_validate(raw)
        _check_methods(file, spec, lines)
    except ValidationError as exc:
        raise _overridden(_error_from_validation(file, exc, lines), given) from None
    except SpecError as exc:
        raise _overridden(exc, given) from None
    return spec


def field_line(path: str | Path, field: str) -> Optional[int]:
    """The line of a dotted field (e.g. `data.eval.path`) in a spec file, or of its deepest ancestor there."""
    try:
        lines = _yaml_lines(Path(path).read_text())
    except OSError:
        return None
    return _line_for(lines, tuple(field.split(".")))


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> SweepSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(str(path), "", f"cannot read spec: {exc.strerror}") from None
    return parse_spec(text, str(path), overrides)
