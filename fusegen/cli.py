"""`fusegen build [SPEC ...] [--check]`: specs/*.fuse -> generated/*.py.
`fusegen lint FILE [...] [--kernelbench] [--format json] [--rules]`: the seeds' rules and KernelBench's
static checker, checked on Python source.
`fusegen bench SPEC [...] [--batch N ...] [--mode eval train] [--max-autotune] [--no-compile] [--json FILE]`:
GPU timings against torch.
`fusegen import MODEL.py [--class NAME] [--args JSON] [--input JSON] [-o SPEC]`: a spec for a PyTorch model.
`fusegen ops [--markdown | --write DOC]`: the op table, from the op registry.
`fusegen --version`: the installed package's version."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import multiprocessing
import os
import re
import stat
import sys
import tempfile
import tokenize
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from fusegen import optable
from fusegen.errors import SpecError
from fusegen.lint import RULES, lint_source
from fusegen.pipeline import compile_spec

SPEC_DIR = Path("specs")
OUT_DIR = Path("generated")
INTERNAL_ERROR = 70  # EX_SOFTWARE: a fusegen bug, not a bad spec (2)
LINT_MAX_BYTES = 4 * 2**20  # generated model files are ~100 kB; the limit bounds lint's time and memory
SPEC_MAX_BYTES = 2**20  # specs are a few kB; the limit bounds a build's time and memory


class InputError(Exception):
    """A file fusegen cannot read or write; the message says why."""


def _output_path(spec: Path, out_dir: Path) -> Path:
    return out_dir / f"{spec.stem}.py"


def _read_regular(path: Path, max_bytes: int, reader: str, cannot: str = "cannot read") -> bytes:
    """The bytes of a regular file of at most `max_bytes`. Opened without blocking, so that a FIFO or a
    device is refused rather than waited on or read forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise InputError(f"{cannot}: {err.strerror}") from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError("not a regular file")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as err:
            raise InputError(f"{cannot}: {err.strerror}") from err
    if len(data) > max_bytes:
        raise InputError(f"larger than {max_bytes // 2**20} MiB, the most {reader}")
    return data


def _read_spec(path: Path) -> str:
    """A spec's text, decoded as Python decodes source: UTF-8, or the encoding a BOM or a `# coding:`
    line in the first two lines names."""
    data = _read_regular(path, SPEC_MAX_BYTES, "fusegen build reads", "cannot read spec")
    lines = iter(data.splitlines(keepends=True))
    try:
        encoding, _ = tokenize.detect_encoding(lambda: next(lines, b""))
        return data.decode(encoding)
    except (SyntaxError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read spec: {err}") from err


def _write_all(outputs: dict[Path, str]) -> None:
    """Writes every file or none: each goes to a temporary file beside it first, and only when all are
    written do they replace their targets. Files get the mode the umask gives a new file."""
    umask = os.umask(0)
    os.umask(umask)
    for path in outputs:
        if path.exists() and not path.is_file():
            raise InputError(f"{path}: error: cannot write: not a regular file")
    written: dict[Path, str] = {}
    try:
        for path, text in outputs.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            written[path] = tmp
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
            os.chmod(tmp, 0o666 & ~umask)
        for path, tmp in written.items():
            os.replace(tmp, path)
    except OSError as err:
        for tmp in written.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        where = err.filename if err.filename else next(iter(outputs))
        raise InputError(f"{where}: error: cannot write: {err.strerror or err}") from err


def _current(path: Path) -> str | None:
    """The text of an existing generated file; None if there is none (or nothing fusegen wrote)."""
    try:
        return _read_regular(path, 2 * LINT_MAX_BYTES, "fusegen build compares").decode("utf-8")
    except (InputError, UnicodeDecodeError):
        return None


# Specs compile in parallel from this many on: a worker process starts in about a second (it imports torch).
PARALLEL_FROM = 4


def _compile_one(spec: Path, out_dir: Path) -> tuple[str | None, list[str], bool]:
    """One spec read, compiled and linted: (generated text or None, error lines, whether an error is
    fusegen's own). Runs in a worker process of `_compile_all`."""
    try:
        source = _read_spec(spec)
    except InputError as err:
        return None, [f"{spec}: error: {err}"], False
    try:
        text = compile_spec(source, spec.as_posix())
    except SpecError as err:
        return None, [err.render(spec.as_posix(), source)], False
    except (RecursionError, MemoryError):  # a limit of fusegen.parse or fusegen.check should have said so
        return None, [f"{spec}: error: too large or nested too deeply for fusegen"], False
    # The generated code must pass `fusegen lint`; if it does not, the generator is wrong.
    try:
        violations = [
            str(v) for v in lint_source(text, _output_path(spec, out_dir).as_posix()) if v.severity == "error"
        ]
    except (SyntaxError, RecursionError, MemoryError) as err:
        violations = [f"lint cannot check it: {type(err).__name__}: {err}"]
    if violations:
        header = (
            f"fusegen: internal error: generated code for {spec} violates lint rules (a generator bug, please report):"
        )
        return None, [header, *(f"  {v}" for v in violations)], True
    return text, [], False


def _compile_all(specs: list[Path], out_dir: Path) -> list[tuple[str | None, list[str], bool]]:
    """_compile_one of each spec, in order; on several processes where there are enough specs (spawned, not
    forked: a forked child of a process whose torch threads run can hang)."""
    workers = min(len(specs), os.cpu_count() or 1)
    if len(specs) < PARALLEL_FROM or workers < 2:
        return [_compile_one(spec, out_dir) for spec in specs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_one, specs, [out_dir] * len(specs)))


def build(args: argparse.Namespace) -> int:
    specs = [Path(s) for s in args.specs] or sorted(SPEC_DIR.glob("*.fuse"))
    if not specs:
        print(f"fusegen: no specs given and none found in {SPEC_DIR}/", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    # Compile everything first: a bad spec leaves generated/ untouched.
    outputs: dict[Path, str] = {}
    failed = False
    by_output: dict[Path, Path] = {}
    for spec in specs:
        first = by_output.setdefault(_output_path(spec, out_dir), spec)
        if first != spec:
            print(f"{spec}: error: {first} writes {_output_path(spec, out_dir)} too; build them apart", file=sys.stderr)
            failed = True
    results = [] if failed else _compile_all(specs, out_dir)
    for spec, (text, errors, internal) in zip(specs, results):
        for line in errors:
            print(line, file=sys.stderr)
        if text is not None:
            outputs[spec] = text
        failed = failed or bool(errors)
    if failed:
        print("fusegen: nothing written", file=sys.stderr)
        bad_input = not results or any(errors and not internal for _, errors, internal in results)
        return 2 if bad_input else INTERNAL_ERROR
    if args.check:
        stale = []
        for spec, text in outputs.items():
            path = _output_path(spec, out_dir)
            if _current(path) != text:
                stale.append(path)
        for path in stale:
            print(f"{path}: stale; run `fusegen build` and commit it", file=sys.stderr)
        if not stale:
            print(f"fusegen: {len(outputs)} generated file(s) up to date")
        return 1 if stale else 0
    changed = {_output_path(spec, out_dir): text for spec, text in outputs.items()}
    changed = {path: text for path, text in changed.items() if _current(path) != text}
    try:
        _write_all(changed)
    except InputError as err:
        print(err, file=sys.stderr)
        print("fusegen: nothing written", file=sys.stderr)
        return 2
    for spec, text in outputs.items():
        path = _output_path(spec, out_dir)
        unchanged = path not in changed
        kernels = len(re.findall(r"^@triton\.jit\ndef \w+_kernel\(", text, re.MULTILINE))  # not the jit helpers
        print(f"{spec} -> {path} ({kernels} kernels{', unchanged' if unchanged else ''})")
    return 0


def _read_python(path: Path) -> str:
    """The text of a regular UTF-8 file of at most LINT_MAX_BYTES."""
    try:
        return _read_regular(path, LINT_MAX_BYTES, "fusegen lint checks").decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"cannot read: {err}") from err


def _lint_targets(name: str) -> list[Path]:
    """FILE as given, or a directory's *.py files."""
    path = Path(name)
    if not path.is_dir():
        return [path]
    files = sorted(path.glob("*.py"))
    if not files:
        raise InputError("no .py files in this directory")
    return files


def lint(args: argparse.Namespace) -> int:
    rules = [r for r in RULES if r.id.startswith("KB")] if args.kernelbench else RULES
    if args.rules:
        for r in rules:
            print(f"{r.id}  {r.name}{' (warning)' if r.severity == 'warning' else ''}: {r.rationale}")
        return 0
    if not args.files:
        print("fusegen: no files to lint", file=sys.stderr)
        return 2
    violations = []
    unreadable = False
    for name in args.files:
        try:
            paths = _lint_targets(name)
        except InputError as err:
            print(f"{name}: error: {err}", file=sys.stderr)
            unreadable = True
            continue
        for path in paths:
            try:
                violations += lint_source(_read_python(path), str(path), rules)
            except InputError as err:
                print(f"{path}: error: {err}", file=sys.stderr)
                unreadable = True
            except SyntaxError as err:
                where = f"{path}:{err.lineno}:{err.offset or 1}" if err.lineno else str(path)
                print(f"{where}: error: not valid Python: {err.msg}", file=sys.stderr)
                unreadable = True
            except (RecursionError, MemoryError):  # MemoryError: Python's parser on some deep nesting
                print(f"{path}: error: nested too deeply to check (Python's recursion limit)", file=sys.stderr)
                unreadable = True
    if args.format == "json":
        print(json.dumps([v.as_dict() for v in violations], indent=2))
    else:
        for violation in violations:
            print(violation)
    return 2 if unreadable else 1 if any(v.severity == "error" for v in violations) else 0


def bench(args: argparse.Namespace) -> int:
    from fusegen.bench import main as run_bench  # imports triton: only for this command

    modes = list(dict.fromkeys(args.mode))  # in the order given, each once
    return run_bench(
        args.specs, args.batch, args.max_autotune, args.json, torch_compile=not args.no_compile, modes=modes
    )


def import_model(args: argparse.Namespace) -> int:
    from fusegen.importer import ImportFailure, load, to_spec, verify  # imports torch.fx: only for this command

    try:
        init_args = None if args.args is None else json.loads(args.args)
        shape = None if args.input is None else json.loads(args.input)
    except json.JSONDecodeError as err:
        print(f"fusegen: --args and --input take JSON: {err}", file=sys.stderr)
        return 2
    if init_args is not None and not isinstance(init_args, (list, dict)):
        print("fusegen: --args takes a JSON list (positional) or object (keywords)", file=sys.stderr)
        return 2
    if shape is not None and not (isinstance(shape, list) and all(isinstance(d, int) and d > 0 for d in shape)):
        print("fusegen: --input takes the input's shape as a JSON list of positive integers", file=sys.stderr)
        return 2
    path = Path(args.file)
    if not path.is_file():
        print(f"{path}: error: no such file", file=sys.stderr)
        return 2
    try:
        source = load(path.resolve(), args.class_name, init_args, shape)
        text = to_spec(source)
        verify(source, text)
    except ImportFailure as err:
        print(err.render(str(path)), file=sys.stderr)
        print("fusegen: nothing written", file=sys.stderr)
        return 2
    except (SpecError, AssertionError) as err:
        print(
            f"fusegen: internal error: the imported spec does not build as the model (a fusegen bug): {err}",
            file=sys.stderr,
        )
        print("fusegen: nothing written", file=sys.stderr)
        return INTERNAL_ERROR
    if args.output is None:
        print(text, end="")
        return 0
    try:
        _write_all({Path(args.output): text})
    except InputError as err:
        print(err, file=sys.stderr)
        print("fusegen: nothing written", file=sys.stderr)
        return 2
    print(f"{path} -> {args.output}")
    return 0


def list_ops(args: argparse.Namespace) -> int:
    if args.write:
        try:
            changed = optable.write(Path(args.write))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            print(f"{args.write}: error: {getattr(err, 'strerror', None) or err}", file=sys.stderr)
            return 2
        print(f"{args.write}: op table {'rewritten' if changed else 'up to date'}")
        return 0
    print(optable.render_markdown() if args.markdown else optable.render_text(), end="")
    return 0


def _version() -> str:
    try:
        return importlib.metadata.version("fusegen")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that pip never installed
        return "unknown (not installed)"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fusegen", description="Fused Triton kernels and a ModelNew from a .fuse spec."
    )
    parser.add_argument("--version", action="version", version=f"fusegen {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("build", help="generate Python files from specs (default: every specs/*.fuse)")
    p.add_argument("specs", nargs="*", metavar="SPEC", help="spec files; default: specs/*.fuse")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated file is stale")
    p.add_argument("--out-dir", default=str(OUT_DIR), help="where generated files go (default: generated)")
    p.set_defaults(run=build)
    p = commands.add_parser(
        "lint", help="check Triton model files against the seeds' rules and KernelBench's checker (never runs them)"
    )
    p.add_argument("files", nargs="*", metavar="FILE", help="Python files (a directory: its *.py files)")
    p.add_argument(
        "--kernelbench",
        action="store_true",
        help='only the KB rules: KernelBench\'s validate_kernel_static(backend="triton", precision="fp32")',
    )
    p.add_argument("--format", choices=("text", "json"), default="text", help="text: file:line:col: RULE message")
    p.add_argument("--rules", action="store_true", help="list the rules with their rationale and exit")
    p.set_defaults(run=lint)
    p = commands.add_parser(
        "bench", help="time ModelNew against eager torch and torch.compile on the GPU; profile each kernel"
    )
    p.add_argument("specs", nargs="+", metavar="SPEC", help="spec files, compiled in memory (generated/ is not read)")
    p.add_argument(
        "--batch", type=_positive_int, nargs="+", metavar="N", help="batch sizes (default: the spec's example input)"
    )
    p.add_argument(
        "--mode",
        choices=("eval", "train"),
        nargs="+",
        default=["eval"],
        help="eval: model.eval(); train: model.train() under torch.no_grad(), as KernelBench times (default: eval)",
    )
    p.add_argument(
        "--max-autotune", action="store_true", help="also time torch.compile(mode='max-autotune'): compiles for minutes"
    )
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="leave out the torch.compile baselines (they compile for minutes): for comparing fusegen versions",
    )
    p.add_argument(
        "--json",
        metavar="FILE",
        help="also write every measurement to FILE as JSON, after each run (Ctrl-C keeps the runs finished)",
    )
    p.set_defaults(run=bench)
    p = commands.add_parser(
        "import",
        help="write a spec for a PyTorch model file (KernelBench's layout: Model, get_init_inputs, get_inputs)",
    )
    p.add_argument("file", metavar="MODEL.py", help="the Python file that defines the model")
    p.add_argument("--class", dest="class_name", default="Model", help="the nn.Module class (default: Model)")
    p.add_argument("--args", help="constructor arguments as JSON, a list or an object (default: get_init_inputs())")
    p.add_argument("--input", help="the example input's shape as JSON, [N, C, H, W] (default: get_inputs()'s)")
    p.add_argument("-o", "--output", metavar="SPEC", help="write the spec here (default: print it)")
    p.set_defaults(run=import_model)
    p = commands.add_parser("ops", help="list the ops a spec can use (from the op registry, fusegen/ops.py)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--markdown", action="store_true", help="print the table as Markdown (docs/dsl.md's form)")
    shape.add_argument(
        "--write", metavar="DOC", help="rewrite the Markdown table between DOC's op-table markers (docs/dsl.md)"
    )
    p.set_defaults(run=list_ops)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
