"""torch.export `.pt2` archives, opened so that nothing in the file runs.

`torch.export.load` trusts its archive. It unpickles the sample inputs (retrying with weights_only=False when the
safe unpickler refuses them), weights and constants flagged `use_pickle`, and custom objects. It parses the
program's shape expressions with sympy.sympify (Python's eval) and turns its guards into Python source that it
exec's. It loads AOTInductor shared libraries, and a graph may call any registered operator, aten.from_file included.
vitkit hands torch a .pt2 only after checking, from the zip directory and the archive's JSON alone, that none
of that can happen:

- the archive is bounded (entry count, declared sizes, compression ratio) before any entry is read;
- it holds only what torch.export.save writes for a program: JSON, raw tensor bytes, text extras. Compiled code,
  pickled weights, constants or objects, and any other entry are refused, naming the entry;
- the sample inputs are never read: torch gets a copy of the archive with that entry emptied, which it skips,
  and so also generates no guard code (the program still checks its inputs against its range constraints);
- every shape expression is a sympy constructor call over numbers and symbol names, every guard an arithmetic
  comparison of input sizes, and every graph node a tensor (aten) or symbolic-integer operation that takes
  no file name.
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import math
import os
import re
import shutil
import zipfile
import zlib
from pathlib import Path

import torch

from vitkit.errors import VitkitError
from vitkit.model.formats.archives import check_zip_directory, format_bytes as _format_bytes

MAX_JSON_BYTES = 64 << 20
MAX_EXPRESSION_CHARS = 10_000

# torch.export.pt2_archive.constants, archive version 0, below the archive's one root folder.
_FIXED_ENTRIES = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_NAME = r"[A-Za-z0-9_]+"
_PROGRAM = re.compile(rf"models/({_NAME})\.json")
_WEIGHTS_CONFIG = re.compile(rf"data/weights/({_NAME})_weights_config\.json")
_CONSTANTS_CONFIG = re.compile(rf"data/constants/({_NAME})_constants_config\.json")
_WEIGHT = re.compile(r"data/weights/(weight_\d+)")
_CONSTANT = re.compile(r"data/constants/(tensor_\d+)")
_SAMPLE_INPUTS = re.compile(rf"data/sample_inputs/{_NAME}\.pt")
_EXTRA = re.compile(r"extra/[^/]+")
_PICKLED = re.compile(r"(^|/)(custom_obj_|opaque_obj_)|\.(pkl|pickle|pt|pth|bin)$")
_COMPILED = ("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")
_PICKLE_HEADERS = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))

# What a graph node may call besides aten operators: torch.export's symbolic-integer operations.
_SYMBOLIC_TARGETS = {
    *(f"_operator.{name}" for name in (
        "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne", "lt", "le", "gt",
        "ge", "and_", "or_", "not_", "lshift", "rshift", "getitem",
    )),
    "math.trunc", "math.ceil", "math.floor",
    *(f"torch.{name}" for name in (
        "sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_not", "sym_sqrt", "_sym_sqrt", "sym_sum",
    )),
}
_ATEN_TARGET = re.compile(r"torch\.ops\.aten\.(?!__)(\w+)\.(?!__)(\w+)", re.ASCII)
# The string arguments aten operators take that name a mode, never a file.
_MODE_ARGUMENTS = {
    "approximate", "rounding_mode", "reduce", "mode", "padding", "interpolation", "indexing", "equation", "side",
    "pad_mode", "padding_side", "norm", "driver", "UPLO", "activation", "algorithm", "ord", "assert_msg", "msg",
    "message",
}
_STRING_TYPE = re.compile(r"\bstr\b")

# Shape expressions: sympy's constructors (srepr form) and torch's integer functions, over numbers and symbols.
_SYMPY_CALLS = {
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Mod", "Min", "Max", "Abs", "floor", "ceiling",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality",
    "Unequality", "And", "Or", "Not", "Piecewise", "ExprCondPair", "sqrt",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "Identity",
}  # no powers or shifts: sympy evaluates Pow(Integer(10), Integer(10**18)) eagerly, a bomb of its own
_SYMPY_CONSTANTS = {"oo", "zoo", "nan", "true", "false", "int_oo"}
_SYMBOL_NAME = re.compile(r"[a-z]{1,8}\d+")
_OPERATORS = (
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd, ast.Not, ast.And, ast.Or,
    ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.BitAnd, ast.BitOr,
)
_MAX_LITERAL = 1 << 63
# Guards: comparisons of the inputs' sizes, L['images'].size()[2] // 8 >= 2, with sympy's integer functions.
_GUARD_FUNCTIONS = _SYMPY_CALLS - {"Symbol", "Integer", "Float", "Rational"}
_SIZE_METHODS = {"size", "stride", "storage_offset", "dim", "numel"}
_MATH_NAMES = {"isnan", "isinf", "inf", "floor", "ceil", "trunc"}


def _refuse(path, problem: str) -> VitkitError:
    return VitkitError(f"'{path}' {problem}: vitkit opens only the programs `vitkit export --file_format=PT2` writes")


# --- entries ----------------------------------------------------------------------------------------------------------


def _classify(path, root: str, info: zipfile.ZipInfo) -> tuple[str, str]:
    """(kind, name below the root) of one entry, or a VitkitError naming what it is."""
    name = info.filename
    if not name.startswith(root + "/") or "\\" in name or "\0" in name or "/../" in f"/{name}/":
        raise _refuse(path, f"has an entry outside its '{root}/' folder ('{name}')")
    rel = name[len(root) + 1 :]
    if rel.startswith(_COMPILED):
        raise _refuse(path, f"holds compiled code ('{name}'), which vitkit never loads")
    if rel in _FIXED_ENTRIES:
        return "fixed", rel
    for kind, pattern in (("program", _PROGRAM), ("weights_config", _WEIGHTS_CONFIG),
                          ("constants_config", _CONSTANTS_CONFIG), ("weight", _WEIGHT), ("constant", _CONSTANT),
                          ("sample_inputs", _SAMPLE_INPUTS), ("extra", _EXTRA)):
        if pattern.fullmatch(rel):
            return kind, rel
    if _PICKLED.search(rel):
        raise _refuse(path, f"holds pickled data ('{name}'), which could run code when loaded; vitkit never unpickles it")
    raise _refuse(path, f"has an entry a torch.export program does not have ('{name}')")


def _read_json(path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> dict:
    if info.file_size > MAX_JSON_BYTES:
        raise _refuse(path, f"has a {_format_bytes(info.file_size)} '{info.filename}', more than vitkit parses "
                            f"({_format_bytes(MAX_JSON_BYTES)})")
    data = archive.read(info)
    if data.startswith(_PICKLE_HEADERS):
        raise _refuse(path, f"holds pickled data in '{info.filename}', which could run code when loaded")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise _refuse(path, f"has a '{info.filename}' that is not JSON ({' '.join(str(exc).split())[:80]})") from None
    if not isinstance(value, dict):
        raise _refuse(path, f"has a '{info.filename}' that is not a JSON object")
    return value


def _check_payload_config(path, config: dict, entry: str, raw: dict[str, int], prefix: str) -> None:
    """A weights or constants config names only raw tensor entries, never a pickle, and declares no tensor that
    its entry cannot hold (torch makes torch.zeros(sizes) for an empty entry)."""
    payloads = config.get("config")
    if not isinstance(payloads, dict):
        raise _refuse(path, f"has a '{entry}' without a 'config' object")
    for fqn, meta in payloads.items():
        if not isinstance(meta, dict):
            raise _refuse(path, f"has a '{entry}' whose entry '{fqn}' is not an object")
        if meta.get("use_pickle"):
            raise _refuse(path, f"stores '{fqn}' as pickled data ('{entry}'), which could run code when loaded; "
                                "vitkit never unpickles it")
        file = meta.get("path_name")
        if not isinstance(file, str) or not file.startswith(prefix) or file not in raw:
            raise _refuse(path, f"has a '{entry}' whose '{fqn}' names no tensor entry of the archive ({file!r})")
        tensor_meta = meta.get("tensor_meta")
        sizes = tensor_meta.get("sizes") if isinstance(tensor_meta, dict) else None
        if not isinstance(sizes, list) or not all(
            isinstance(size, dict) and type(size.get("as_int")) is int and size["as_int"] >= 0 for size in sizes
        ):
            raise _refuse(path, f"has a '{entry}' whose '{fqn}' has no fixed non-negative sizes")
        if raw[file] == 0 and math.prod(size["as_int"] for size in sizes) != 0:
            raise _refuse(path, f"declares '{fqn}' of shape {[size['as_int'] for size in sizes]} in an empty entry")


# --- the program's JSON -----------------------------------------------------------------------------------------------


def _check_target(path, target: str) -> None:
    if target in _SYMBOLIC_TARGETS:
        return
    match = _ATEN_TARGET.fullmatch(target)
    overload = None
    if match:
        try:
            overload = getattr(getattr(torch.ops.aten, match[1]), match[2])
        except (AttributeError, RuntimeError):
            overload = None
    if not isinstance(overload, torch._ops.OpOverload):
        raise _refuse(path, f"calls '{target}', which is not a tensor operation vitkit runs (aten or symbolic-size "
                            "arithmetic only)")
    for argument in overload._schema.arguments:
        if _STRING_TYPE.search(str(argument.type)) and argument.name not in _MODE_ARGUMENTS:
            raise _refuse(path, f"calls '{target}', whose '{argument.name}' argument can name a file")


def _check_tree(path, node: ast.AST, allowed, what: str, text: str) -> None:
    for child in ast.walk(node):
        if not allowed(child):
            raise _refuse(path, f"has a {what} that is not plain arithmetic ({text[:80]!r})")


def _parse(path, text: str, what: str) -> ast.AST:
    if len(text) > MAX_EXPRESSION_CHARS:
        raise _refuse(path, f"has a {what} of {len(text)} characters")
    try:
        return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise _refuse(path, f"has a {what} that is not an expression ({text[:80]!r})") from None


def _arithmetic(child: ast.AST) -> bool:
    return isinstance(child, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Load, *_OPERATORS))


def _literal(value) -> bool:
    return isinstance(value, (float, str, bool)) or (isinstance(value, int) and abs(value) < _MAX_LITERAL)


def _check_sympy(path, text: str) -> None:
    """sympy.sympify evaluates its string: only constructor calls over numbers and symbol names may reach it."""

    def allowed(child: ast.AST) -> bool:
        if _arithmetic(child):
            return True
        if isinstance(child, ast.Constant):
            return _literal(child.value) or child.value is None
        if isinstance(child, ast.Name):
            return child.id in _SYMPY_CALLS or child.id in _SYMPY_CONSTANTS or bool(_SYMBOL_NAME.fullmatch(child.id))
        if isinstance(child, ast.Call):
            return isinstance(child.func, ast.Name) and child.func.id in _SYMPY_CALLS
        if isinstance(child, ast.keyword):
            return child.arg is not None and child.arg.isidentifier() and not child.arg.startswith("_") \
                and isinstance(child.value, ast.Constant) and isinstance(child.value.value, bool)
        return False

    _check_tree(path, _parse(path, text, "shape expression"), allowed, "shape expression", text)


def _check_guard(path, text: str) -> None:
    """torch turns guards into Python source it exec's: only comparisons of input sizes may reach it."""

    def allowed(child: ast.AST) -> bool:
        if _arithmetic(child):
            return True
        if isinstance(child, ast.Constant):
            return _literal(child.value)
        if isinstance(child, ast.Name):
            return child.id in ("L", "math", "inf") or child.id in _GUARD_FUNCTIONS
        if isinstance(child, ast.Subscript):
            return isinstance(child.slice, ast.Constant)
        if isinstance(child, ast.Attribute):
            if isinstance(child.value, ast.Name) and child.value.id == "math":
                return child.attr in _MATH_NAMES
            return child.attr in _SIZE_METHODS and not isinstance(child.value, ast.Name)
        if isinstance(child, ast.Call):
            if child.keywords:
                return False
            if isinstance(child.func, ast.Attribute):
                # x.size(), x.stride(0), math.isnan(...): the Attribute itself is checked on its own
                return isinstance(child.func.value, ast.Name) or all(isinstance(arg, ast.Constant) for arg in child.args)
            return isinstance(child.func, ast.Name) and child.func.id in _GUARD_FUNCTIONS
        return False

    _check_tree(path, _parse(path, text, "guard"), allowed, "guard", text)


def _check_program(path, program: dict, entry: str) -> None:
    guards = program.get("guards_code", [])
    if not isinstance(guards, list) or not all(isinstance(guard, str) for guard in guards):
        raise _refuse(path, f"has a '{entry}' whose guards_code is not a list of strings")
    for guard in guards:
        _check_guard(path, guard)
    stack = [program]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "target" and isinstance(item, str):
                    _check_target(path, item)
                elif key == "expr_str" and isinstance(item, str):
                    _check_sympy(path, item)
                stack.append(item)
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str) and ("\r" in value or "\0" in value):
            raise _refuse(path, f"has a '{entry}' with control characters in its strings")


# --- loading ----------------------------------------------------------------------------------------------------------


def checked_archive(path: str | os.PathLike) -> io.BytesIO:
    """The archive as torch may read it: every entry checked, the sample inputs emptied. VitkitError otherwise."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise VitkitError(f"'{path}' is not a readable .pt2 program ({exc}): export it again with vitkit export") from None
    with archive:
        # torch stores every entry uncompressed: any entry that inflates far is a bomb, not a program.
        infos = check_zip_directory(path, archive, what=".pt2 program", per_entry_ratio=True)
        names = [info.filename for info in infos]
        if not infos:
            raise VitkitError(f"'{path}' is an empty zip archive, not a .pt2 program: export it again")
        if len(set(names)) != len(names):
            raise _refuse(path, "has two entries with the same name")
        root = names[0].split("/", 1)[0]
        kinds = [_classify(path, root, info) for info in infos]
        raw = {rel.rsplit("/", 1)[1]: info.file_size for info, (kind, rel) in zip(infos, kinds) if kind == "weight"}
        constants = {rel.rsplit("/", 1)[1]: info.file_size for info, (kind, rel) in zip(infos, kinds) if kind == "constant"}
        try:
            for info, (kind, rel) in zip(infos, kinds):
                if kind == "program":
                    _check_program(path, _read_json(path, archive, info), info.filename)
                elif kind == "weights_config":
                    _check_payload_config(path, _read_json(path, archive, info), info.filename, raw, "weight_")
                elif kind == "constants_config":
                    _check_payload_config(path, _read_json(path, archive, info), info.filename, constants, "tensor_")
                elif kind in ("extra", "fixed"):
                    with archive.open(info) as handle:
                        if handle.read(2) in _PICKLE_HEADERS:
                            raise _refuse(path, f"holds pickled data ('{info.filename}'), which could run code when loaded")
            copy = io.BytesIO()
            with zipfile.ZipFile(copy, "w", zipfile.ZIP_STORED, allowZip64=True) as out:
                for info, (kind, _) in zip(infos, kinds):
                    target = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                    with out.open(target, "w", force_zip64=info.file_size > (1 << 31)) as sink:
                        if kind != "sample_inputs":  # never read: torch skips empty sample inputs
                            with archive.open(info) as source:
                                shutil.copyfileobj(source, sink, 1 << 20)
        except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
            raise VitkitError(f"'{path}' is damaged ({exc}): export it again") from None
    copy.seek(0)
    return copy


@contextlib.contextmanager
def _quiet_torch_export():
    """torch.export logs a traceback for archives it cannot read before raising; vitkit reports them in one line."""
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch._export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def load_pt2_program(path: str | os.PathLike) -> tuple[torch.export.ExportedProgram, dict[str, str]]:
    """The ExportedProgram in a .pt2 and its extra files (name -> text), having run nothing from the file."""
    path = Path(path)
    archive = checked_archive(path)
    # torch fills the dict it is given in place, but replaces an empty one (`extra_files or {}`): hence a placeholder.
    extra: dict[str, str] = {"\0": ""}
    with _quiet_torch_export():
        try:
            program = torch.export.load(archive, extra_files=extra)
        except Exception as exc:  # noqa: BLE001 - torch.export raises many types for a bad archive
            raise VitkitError(f"'{path}' is not a readable .pt2 program ({' '.join(str(exc).split())[:160]})") from None
    extra.pop("\0", None)
    return program, extra
