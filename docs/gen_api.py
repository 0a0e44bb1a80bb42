"""Write docs/api.md, the API reference, from the public objects' signatures and docstrings.

    python docs/gen_api.py            # rewrite docs/api.md
    python docs/gen_api.py --check    # exit 1, saying so, when docs/api.md is not what this script writes

What is public is listed once, in `MODULES` below, from what the code and the docs present as public: the
`partitioner` package's `__all__` (what README.md and docs/usage.md use), the modules behind it that users touch
by name (the Plan's schema, the device presets, the torchrun runtime and its deferred initialization, the Gantt
chart, the command line's entry point), the types that `CompiledModel`'s members return (`TensorParallelPlan`,
`TPCheckReport`, `CPCheckReport` and its `ContextLayout`, `SimResult`), `partitioner.kernels.__all__` and `zoo.__all__`.
An object re-exported by several of those modules is documented at its first listing and linked from the others.

Signatures come from `inspect.signature`, with each annotation as written in the source (read back from the
function's syntax tree) and each default's repr with memory addresses removed, so the output is the same on every
run and machine; dataclass fields carry the comment written beside or above them in the source. Members are listed
in `__all__` order, a class's members in source order. Standard library only.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import inspect
import io
import re
import sys
import textwrap
import tokenize
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "MODULES",
    "OUTPUT",
    "ModuleSpec",
    "documented",
    "format_signature",
    "main",
    "markdown_doc",
    "missing_docstrings",
    "public_objects",
    "render",
]

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the packages are imported from this checkout
    sys.path.insert(0, str(ROOT))
OUTPUT = ROOT / "docs" / "api.md"
COMMAND = "python docs/gen_api.py"
PACKAGES = ("partitioner", "zoo")  # where "defined in" links point, and whose base classes' members count
WIDTH = 100  # a signature longer than this is written one parameter per line


class ModuleSpec(NamedTuple):
    """One section of the reference: a module, the names it documents (None: its `__all__`) and why it is there."""

    module: str
    names: tuple[str, ...] | None = None
    why: str = ""


MODULES: tuple[ModuleSpec, ...] = (
    ModuleSpec("partitioner", None, "The package: `compile`, what it returns, the Plan, device presets, errors."),
    ModuleSpec("partitioner.plan.schema", None, "The Plan as data ([plan-format.md](plan-format.md))."),
    ModuleSpec("partitioner.devices", None, "Device specs and presets ([cost-model.md](cost-model.md))."),
    ModuleSpec("partitioner.runtime.materialize", None, "Deferred initialization: only a rank's tensors made real."),
    ModuleSpec("partitioner.runtime.distributed", None, "The torchrun runtime behind `CompiledModel.distributed`."),
    ModuleSpec("partitioner.plan.tensor", ("TensorParallelPlan",), "`CompiledModel.tensor_parallel_plan`'s type."),
    ModuleSpec("partitioner.runtime.tp_local", ("TPCheckReport",), "What `verify_tensor_parallel` returns."),
    ModuleSpec("partitioner.runtime.cp_local", ("CPCheckReport",), "What `verify_context_parallel` returns."),
    ModuleSpec("partitioner.plan.context", ("ContextLayout",), "`CPCheckReport.layout`'s type."),
    ModuleSpec("partitioner.simulate", ("SimResult",), "`CompiledModel.simulation`'s type."),
    ModuleSpec("partitioner.gantt", None, "The pipeline Gantt chart (`partitioner plan --gantt`)."),
    ModuleSpec("partitioner.cli", ("main",), "The `partitioner` command (`python -m partitioner`)."),
    ModuleSpec("partitioner.kernels", None, "Triton kernels with plain-PyTorch references."),
    ModuleSpec("zoo", None, "The model zoo: presets, example inputs, targets and losses."),
)


# ----------------------------------------------------------------------------------------------------------------
# What is documented
# ----------------------------------------------------------------------------------------------------------------


def public_objects(spec: ModuleSpec) -> list[tuple[str, Any]]:
    """(name, object) for every name the section documents, in `__all__` (or the spec's) order."""
    module = importlib.import_module(spec.module)
    names = spec.names if spec.names is not None else tuple(module.__all__)
    return [(name, getattr(module, name)) for name in names]


def _documented_kind(obj: Any) -> str:
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "function"
    return "constant"


def _own_doc(obj: Any) -> str:
    """The object's own docstring, cleaned; "" when it has none (a dataclass's generated signature is none)."""
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
    if doc is None or isinstance(obj, (int, float, str, bool, dict, list, tuple, set)):
        return ""
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
        return ""  # dataclasses write "Name(field: type, ...)" where the class has no docstring
    if inspect.isclass(obj) and any(doc is getattr(base, "__doc__", None) for base in obj.__mro__[1:]):
        return ""  # inherited
    return inspect.cleandoc(doc)


def _members(cls: type) -> list[tuple[str, str, Any]]:
    """(name, kind, member) of a class's public methods and properties, its own and those of project bases, in
    source order (base classes first); dataclass fields are listed separately."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    fields |= set(getattr(cls, "_fields", ()))  # NamedTuple
    seen: dict[str, tuple[str, Any]] = {}
    for klass in reversed(cls.__mro__):
        if klass is cls or _in_project(klass):
            for name, value in vars(klass).items():
                if name in fields or (name.startswith("_") and name != "__call__"):
                    continue
                if isinstance(value, (property, functools.cached_property)):
                    seen[name] = ("property", value)
                elif isinstance(value, (staticmethod, classmethod)):
                    seen[name] = (type(value).__name__, value.__func__)
                elif inspect.isfunction(value):
                    seen[name] = ("method", value)
                else:
                    seen.pop(name, None)  # overridden by a plain attribute
    return [(name, kind, member) for name, (kind, member) in seen.items()]


def _getter(prop: property | functools.cached_property) -> Callable:
    return prop.fget if isinstance(prop, property) else prop.func


def _in_project(obj: Any) -> bool:
    return (getattr(obj, "__module__", None) or "").split(".")[0] in PACKAGES


def documented() -> list[tuple[str, Any]]:
    """(qualified name, object) of every function, class, method and property the reference documents."""
    out: list[tuple[str, Any]] = []
    seen: set[int] = set()
    for spec in MODULES:
        for name, obj in public_objects(spec):
            if id(obj) in seen or _documented_kind(obj) == "constant":
                continue
            seen.add(id(obj))
            out.append((f"{spec.module}.{name}", obj))
            if inspect.isclass(obj):
                for member, kind, value in _members(obj):
                    out.append((f"{spec.module}.{name}.{member}", _getter(value) if kind == "property" else value))
    return out


def missing_docstrings() -> list[str]:
    """Qualified names of documented functions, classes, methods and properties without a docstring."""
    return [name for name, obj in documented() if not _own_doc(obj)]


# ----------------------------------------------------------------------------------------------------------------
# Source text: annotations as written, comments beside fields and constants
# ----------------------------------------------------------------------------------------------------------------


class _Source(NamedTuple):
    lines: list[str]  # the module's source lines, line ends kept (line n is lines[n - 1])
    tree: ast.Module


@functools.cache
def _module_source(module_name: str) -> _Source | None:
    """A module's source lines and syntax tree (None for modules without Python source)."""
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return None
    return _Source(io.StringIO(source).readlines(), ast.parse(source))


def _comments(source: _Source, node: ast.stmt) -> dict[int, str]:
    """Line number -> comment, over the lines of one statement (tokenizing only those lines)."""
    lines = iter(source.lines[node.lineno - 1 : node.end_lineno])
    found = {}
    try:
        for tok in tokenize.generate_tokens(lambda: next(lines, "")):
            if tok.type == tokenize.COMMENT:
                found[node.lineno + tok.start[0] - 1] = tok.string
    except (tokenize.TokenError, IndentationError):
        pass
    return found


_TOOL_COMMENT = re.compile(r"\s*(noqa\b|fmt:|type:\s*ignore|pragma\b).*$")


def _comment_for(module_name: str, node: ast.stmt) -> str:
    """The comment beside `node` (on its first or last line), else the comment lines right above it, as one text."""
    found = _module_source(module_name)
    if found is None:
        return ""
    comments = _comments(found, node)
    lines = [comments[n] for n in sorted({node.lineno, node.end_lineno}) if n in comments]
    if not lines:  # the comment lines right above
        n = node.lineno - 1
        while n >= 1 and found.lines[n - 1].lstrip().startswith("#") and re.search(r"\w", found.lines[n - 1]):
            lines.insert(0, found.lines[n - 1].strip())  # a "# -----" rule ends the walk: it heads a section
            n -= 1
    texts = [_TOOL_COMMENT.sub("", line.lstrip("#").strip()) for line in lines]
    return " ".join(t for t in texts if t)


_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _def_node(obj: Any) -> ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | None:
    """The syntax tree of a function's or class's definition, found by qualified name in its module."""
    found = _module_source(getattr(obj, "__module__", "") or "")
    if found is None:
        return None
    body: list[ast.stmt] = found.tree.body
    node = None
    for part in getattr(obj, "__qualname__", "").split("."):
        node = next((n for n in body if isinstance(n, _DEFINITIONS) and n.name == part), None)
        if node is None:
            return None
        body = node.body
    return node


def _written_annotations(func: Callable) -> dict[str, str]:
    """Parameter name (and "return") -> its annotation as written in the source, whitespace collapsed."""
    node = _def_node(inspect.unwrap(func))
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return {}
    source = _module_source(inspect.unwrap(func).__module__)
    args = node.args
    out = {}
    for arg in [*args.posonlyargs, *args.args, args.vararg, *args.kwonlyargs, args.kwarg]:
        if arg is not None and arg.annotation is not None:
            out[arg.arg] = _segment(source, arg.annotation)
    if node.returns is not None:
        out["return"] = _segment(source, node.returns)
    return out


def _segment(source: _Source, node: ast.expr) -> str:
    """The source text of an expression, whitespace collapsed (ast's columns count UTF-8 bytes)."""
    lines = [line.encode() for line in source.lines[node.lineno - 1 : node.end_lineno]]
    lines[-1] = lines[-1][: node.end_col_offset]
    lines[0] = lines[0][node.col_offset :]
    text = b"".join(lines).decode()
    return " ".join(text.split()).replace("[ ", "[").replace(" ]", "]").replace(",]", "]")


def _find_assignment(module_name: str, name: str) -> tuple[str, ast.stmt] | None:
    """Where a module-level name is assigned: (module, statement), following `from x import name` re-exports."""
    found = _module_source(module_name)
    if found is None:
        return None
    for node in found.tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return module_name, node
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return module_name, node
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if any((alias.asname or alias.name) == name for alias in node.names):
                original = next(alias.name for alias in node.names if (alias.asname or alias.name) == name)
                return _find_assignment(node.module, original)
    return None


# ----------------------------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------------------------

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _stable_repr(value: Any) -> str:
    """repr without memory addresses; functions and classes by their qualified name."""
    if inspect.isfunction(value) or inspect.isclass(value) or inspect.isbuiltin(value):
        module = getattr(value, "__module__", None)
        prefix = "" if module in (None, "builtins") else f"{module}."
        return prefix + value.__qualname__
    if isinstance(value, str) and repr(value)[1:-1] == value and '"' not in value:
        return f'"{value}"'  # the codebase's quotes
    if type(value) in (dict, list, tuple) and len(value):
        items = (
            [f"{_stable_repr(k)}: {_stable_repr(v)}" for k, v in value.items()]
            if isinstance(value, dict)
            else [_stable_repr(v) for v in value]
        )
        open_, close = {dict: "{}", list: "[]", tuple: "()"}[type(value)]
        return open_ + ", ".join(items) + ("," if type(value) is tuple and len(value) == 1 else "") + close
    return _ADDRESS.sub("", repr(value))


def _annotation_text(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def format_signature(name: str, func: Callable, *, indent: str = "") -> str:
    """`def name(param: annotation = default, ...) -> return`, one parameter per line when long."""
    prefix = f"{indent}def "
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return f"{prefix}{name}(...)"
    written = _written_annotations(func) if inspect.isfunction(inspect.unwrap(func)) else {}
    params = list(signature.parameters.values())
    parts: list[str] = []
    star_written = False
    for i, p in enumerate(params):
        if p.kind is p.KEYWORD_ONLY and not star_written:
            parts.append("*")
            star_written = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        star_written |= p.kind is p.VAR_POSITIONAL
        if p.annotation is not p.empty:
            text += ": " + written.get(p.name, _annotation_text(p.annotation))
        if p.default is not p.empty:
            text += (" = " if p.annotation is not p.empty else "=") + _stable_repr(p.default)
        parts.append(text)
        if p.kind is p.POSITIONAL_ONLY and (i + 1 == len(params) or params[i + 1].kind is not p.POSITIONAL_ONLY):
            parts.append("/")
    returns = ""
    if signature.return_annotation is not signature.empty:
        returns = " -> " + written.get("return", _annotation_text(signature.return_annotation))
    one_line = f"{prefix}{name}({', '.join(parts)}){returns}"
    if len(one_line) <= WIDTH:
        return one_line
    body = "".join(f"{indent}    {part},\n" for part in parts)
    return f"{prefix}{name}(\n{body}{indent}){returns}"


_CODE_SPAN = re.compile(r"(``.+?``|`[^`\n]+(?:\n[^`\n]+)?`)", re.DOTALL)


def _escape_prose(text: str) -> str:
    """Markdown escapes for docstring prose outside code spans: HTML-like `<`, `*` and `_` that would start or end
    emphasis (intraword `_` as in `node_stage`, list markers and `*word*` emphasis are left alone), and line starts
    that would make a heading or a quote."""
    spans: list[str] = []

    def hide(match: re.Match) -> str:
        spans.append(match.group(0))
        return f"\x00{len(spans) - 1}\x00"

    text = _CODE_SPAN.sub(hide, text)
    text = re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)
    text = "\n".join(_escape_stars(line) for line in text.split("\n"))
    text = re.sub(r"(?<![A-Za-z0-9\\])_|_(?![A-Za-z0-9])", r"\\_", text)
    text = re.sub(r"(?m)^(\s*)([#>])", r"\1\\\2", text)
    return re.sub("\x00(\\d+)\x00", lambda m: spans[int(m.group(1))], text)


_EMPHASIS = re.compile(r"(?<![\w*\\])\*[A-Za-z][^*\n]*?[A-Za-z.]\*(?![\w*])")


def _escape_stars(line: str) -> str:
    """Every `*` escaped but a list marker ("* " at the start of a line) and `*emphasis*`."""
    if re.fullmatch(r"\*\*\w+:\*\*", line):  # a section title markdown_doc wrote
        return line
    marker = re.match(r"\s*\* ", line)
    keep = marker.end() if marker else 0
    pieces = _EMPHASIS.split(line[keep:])
    kept = _EMPHASIS.findall(line[keep:])
    escaped = [piece.replace("*", "\\*") for piece in pieces]
    return line[:keep] + "".join(e + k for e, k in zip(escaped, [*kept, ""]))


# A docstring line that starts an entry such as "device_type: ...", "inputs/kwargs: ..." or "pipeline / tensor: ..."
_ENTRY = re.compile(r"`*[A-Za-z_][\w.]*`*(\s?[/,]\s?`*[A-Za-z_][\w.]*`*)*( \([^)]*\))?: ")


def _paragraphs(lines: list[str]) -> list[str]:
    """Docstrings list entries ("name: what it is") one per line; Markdown would run them into one paragraph, so
    each entry that follows a finished sentence starts a paragraph of its own."""
    out: list[str] = []
    for line in lines:
        if out and out[-1].strip() and _ENTRY.match(line) and re.search(r"[.:;][)\"']?$", out[-1]):
            out.append("")
        out.append(line)
    return out


_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):(`[^`]+`)")  # Sphinx roles: just the code span
_SECTION = re.compile(r"(Args|Arguments|Parameters|Returns|Yields|Raises|Attributes):\s*")  # Google style
_SECTION_NAMES = re.compile(r"([\w*]+(?:, [\w*]+)*): ")


def _google_sections(lines: list[str]) -> list[str]:
    """Google-style sections ("Args:" over indented entries) as a bold title over a bullet list, one bullet per
    entry, its continuation lines inside the bullet."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _SECTION.fullmatch(lines[i])
        body = []
        j = i + 1
        while match and j < len(lines) and lines[j].startswith(" ") and lines[j].strip():
            body.append(lines[j])
            j += 1
        if not body:
            out.append(lines[i])
            i += 1
            continue
        indent = min(len(line) - len(line.lstrip()) for line in body)
        out += ["", f"**{match.group(1)}:**", ""]
        for line in body:
            names = _SECTION_NAMES.match(line.strip())
            if line is body[0] or (names and len(line) - len(line.lstrip()) == indent):
                quoted = ", ".join(f"`{name}`" for name in names.group(1).split(", ")) if names else ""
                out.append(f"- {quoted}: {line.strip()[names.end() :]}" if names else f"- {line.strip()}")
            else:  # the entry goes on
                out.append("  " + line.strip())
        out.append("")
        i = j
    return out


def markdown_doc(doc: str) -> str:
    """A cleaned docstring as Markdown: prose escaped, entry lists kept apart, Google-style sections as lists,
    indented blocks after a blank line (examples) as Python code."""
    blocks: list[tuple[bool, list[str]]] = []  # (is code, lines)
    for line in _google_sections(_ROLE.sub(r"\1", doc).splitlines()):
        in_code = bool(blocks) and blocks[-1][0]
        after_blank = not blocks or not blocks[-1][1][-1].strip()
        if in_code and (not line.strip() or line.startswith("    ")):
            blocks[-1][1].append(line)
        elif line.startswith("    ") and after_blank and not in_code:
            blocks.append((True, [line]))
        elif blocks and not in_code:
            blocks[-1][1].append(line)
        else:
            blocks.append((False, [line]))
    out = []
    for code, block in blocks:
        text = "\n".join(block).strip("\n")
        if code:
            out.append("```python\n" + textwrap.dedent(text) + "\n```")
        elif text.strip():
            out.append(_escape_prose("\n".join(_paragraphs(text.split("\n")))))
    return re.sub(r"\n{3,}", "\n\n", "\n\n".join(out)).strip() + "\n"


class _Slugs:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces to '-', repeats numbered."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, heading: str) -> str:
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = self.counts.get(slug, 0)
        self.counts[slug] = n + 1
        return slug if n == 0 else f"{slug}-{n}"


def _source_link(obj: Any, module_name: str | None = None) -> str:
    """`[path](../path)` of the file defining `obj` (a function or class), or of `module_name`."""
    try:
        path = Path(inspect.getsourcefile(inspect.unwrap(obj) if module_name is None else sys.modules[module_name]))
        relative = path.resolve().relative_to(ROOT).as_posix()
    except (TypeError, ValueError, KeyError):
        return ""
    return f"[`{relative}`](../{relative})"


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def _render_function(qualname: str, func: Callable) -> list[str]:
    out = ["```python", format_signature(qualname.rsplit(".", 1)[-1], func), "```", ""]
    link = _source_link(func)
    if link:
        out += [f"Defined in {link}.", ""]
    doc = _own_doc(func)
    if doc:
        out.append(markdown_doc(doc))
    return out


def _class_header(cls: type) -> str:
    """`class Name(Base, ...)` as written, after its dataclass decorator, or over its `__init__`'s signature."""
    node = _def_node(cls)
    if isinstance(node, ast.ClassDef):
        source = _module_source(cls.__module__)
        bases = [_segment(source, b) for b in node.bases] + [_segment(source, k) for k in node.keywords]
    else:
        bases = [b.__qualname__ for b in cls.__bases__ if b is not object]
    header = f"class {cls.__name__}" + (f"({', '.join(bases)})" if bases else "")
    if dataclasses.is_dataclass(cls):
        flags = ["frozen=True"] if cls.__dataclass_params__.frozen else []
        flags += ["kw_only=True"] if _kw_only(cls) else []
        return "@dataclass" + (f"({', '.join(flags)})" if flags else "") + "\n" + header
    init = vars(cls).get("__init__")
    if inspect.isfunction(init) and init.__qualname__ == f"{cls.__qualname__}.__init__":  # not Protocol's stand-in
        return header + ":\n" + format_signature("__init__", init, indent="    ")
    return header


def _kw_only(cls: type) -> bool:
    fields = dataclasses.fields(cls)
    return bool(fields) and all(f.kw_only for f in fields)


def _field_lines(cls: type) -> list[str]:
    """One bullet per dataclass or NamedTuple field: `name: type = default`, then its source comment."""
    if dataclasses.is_dataclass(cls):
        items = [(f.name, f.type, f.default, f.default_factory) for f in dataclasses.fields(cls) if f.name[0] != "_"]
        missing = dataclasses.MISSING
    else:
        defaults = getattr(cls, "_field_defaults", {})
        missing = object()
        items = [(n, cls.__annotations__.get(n, ""), defaults.get(n, missing), missing) for n in cls._fields]
    written = {}
    for klass in reversed(cls.__mro__):
        node = _def_node(klass) if _in_project(klass) else None
        if isinstance(node, ast.ClassDef):
            source = _module_source(klass.__module__)
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    written[stmt.target.id] = (_segment(source, stmt.annotation), _comment_for(klass.__module__, stmt))
    out = []
    for name, annotation, default, factory in items:
        text, comment = written.get(name, (_annotation_text(annotation), ""))
        line = f"- `{name}: {text}"
        if default is not missing:
            line += f" = {_stable_repr(default)}"
        elif factory is not missing:
            line += f" = {_stable_repr(factory())}"
        line += "`"
        if comment:
            line += ": " + _escape_prose(comment)
        out.append(line)
    return out


def _render_class(qualname: str, cls: type, slugs: _Slugs, toc: list[str]) -> list[str]:
    out = ["```python", _class_header(cls), "```", ""]
    link = _source_link(cls)
    if link:
        out += [f"Defined in {link}.", ""]
    doc = _own_doc(cls)
    if doc:
        out += [markdown_doc(doc)]
    if dataclasses.is_dataclass(cls) or hasattr(cls, "_fields"):
        out += ["**Fields**", "", *_field_lines(cls), ""]
    members = _members(cls)
    properties = [(n, m) for n, kind, m in members if kind == "property"]
    methods = [(n, kind, m) for n, kind, m in members if kind != "property"]
    if properties:
        out += ["**Properties**", ""]
        for name, prop in properties:
            getter = _getter(prop)
            returns = _written_annotations(getter).get("return")
            line = f"- `{name}" + (f" -> {returns}`" if returns else "`")
            doc = _own_doc(getter)
            if doc:
                line += ": " + textwrap.indent(markdown_doc(doc).strip(), "  ").lstrip()
            out.append(line)
        out.append("")
    if methods:
        out += ["**Methods**", ""]
        for name, kind, func in methods:
            heading = f"{qualname.rsplit('.', 1)[-1]}.{name}"
            slug = slugs(heading)
            toc.append(f"    - [`{heading}`](#{slug})")
            out += [f"#### `{heading}`", ""]
            decorator = "" if kind == "method" else f"@{kind}\n"
            out += ["```python", decorator + format_signature(name, func), "```", ""]
            doc = _own_doc(func)
            if doc:
                out.append(markdown_doc(doc))
    return out


def _render_constant(module_name: str, name: str, value: Any) -> list[str]:
    found = _find_assignment(module_name, name)
    annotation, comment, link = "", "", ""
    if found is not None:
        where, node = found
        if isinstance(node, ast.AnnAssign):
            annotation = ": " + _segment(_module_source(where), node.annotation)
        comment = _comment_for(where, node)
        link = _source_link(None, where)
    if isinstance(value, (int, float, str, bool)) or value is None:
        shown = f"{name}{annotation} = {_stable_repr(value)}"
    elif isinstance(value, dict) and all(isinstance(k, str) for k in value):
        inner = _stable_repr(value)
        shown = (
            f"{name}{annotation} = {inner}"
            if len(inner) <= WIDTH
            else f"{name}{annotation}  # keys: {', '.join(value)}"
        )
    else:
        shown = f"{name}{annotation}"
    out = ["```python", shown, "```", ""]
    if link:
        out += [f"Defined in {link}.", ""]
    if comment:
        out += [_escape_prose(comment[0].upper() + comment[1:]) + ("" if comment.endswith(".") else "."), ""]
    return out


def render() -> str:
    """The whole of docs/api.md as text."""
    slugs = _Slugs()
    toc: list[str] = []
    body: list[str] = []
    home: dict[int, tuple[str, str]] = {}  # id(object) -> (qualified name, anchor) where it is documented
    slugs("API reference")
    slugs("Contents")
    for spec in MODULES:
        module = importlib.import_module(spec.module)
        heading = f"`{spec.module}`"
        slug = slugs(heading)
        toc.append(f"- [`{spec.module}`](#{slug})" + (f": {spec.why}" if spec.why else ""))
        body += [f"## {heading}", ""]
        if spec.why:
            body += [f"*{spec.why}*", ""]
        link = _source_link(None, spec.module)
        doc = inspect.getdoc(module) or ""
        if spec.names is not None:  # a few names of a larger module: its summary line only
            doc = doc.split("\n\n")[0]
            body += [f"Module {link}; only the names listed here are documented." if link else "", ""]
        elif link:
            body += [f"Module {link}.", ""]
        if doc:
            body.append(markdown_doc(doc))
        for name, obj in public_objects(spec):
            qualname = f"{spec.module}.{name}"
            kind = _documented_kind(obj)
            first, first_slug = home.get(id(obj), (None, None)) if kind != "constant" else (None, None)
            heading = f"`{qualname}`"
            if first is not None:
                body += [f"### {heading}", "", f"The same object as [`{first}`](#{first_slug}).", ""]
                slug = slugs(heading)
                toc.append(f"  - [`{qualname}`](#{slug}) (see `{first}`)")
                continue
            slug = slugs(heading)
            toc.append(f"  - [`{qualname}`](#{slug})")
            body += [f"### {heading}", ""]
            if kind == "class":
                home[id(obj)] = (qualname, slug)
                body += _render_class(qualname, obj, slugs, toc)
            elif kind == "function":
                home[id(obj)] = (qualname, slug)
                body += _render_function(qualname, obj)
            else:
                body += _render_constant(spec.module, name, obj)
    header = [
        f"<!-- Generated by docs/gen_api.py from the docstrings: do not edit by hand. Regenerate: {COMMAND} -->",
        "",
        "# API reference",
        "",
        "Generated from the public objects' signatures and docstrings by [gen_api.py](gen_api.py) "
        f"(`{COMMAND}`); `tests/test_api_docs.py` fails when this page is out of date. Signatures show each "
        "annotation as written in the source. How to use these: [usage.md](usage.md); the Plan's fields: "
        "[plan-format.md](plan-format.md); how plans are priced: [cost-model.md](cost-model.md).",
        "",
        "## Contents",
        "",
        *toc,
        "",
    ]
    text = "\n".join(header + body)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write docs/api.md (or, with --check, report whether it is up to date); return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/api.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({len(text.encode())} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
