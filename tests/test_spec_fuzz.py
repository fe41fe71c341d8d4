"""`fusegen build` on mutations of the shipped specs (tokens deleted, duplicated, swapped, replaced;
numbers replaced by extreme values; keywords and punctuation inserted). The contract: either the build
succeeds and writes a module that compiles (a few small ones are also imported and instantiated), or it
exits 2 with one `file:line:col: error:` and writes nothing. Never a traceback, never a hang."""

import contextlib
import importlib.util
import io
import re
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from fusegen import cli

ROOT = Path(__file__).resolve().parent.parent
SPECS = {path.name: path.read_text(encoding="utf-8") for path in sorted((ROOT / "specs").glob("*.fuse"))}
# Specs whose mutants are also imported and instantiated (on the meta device: no memory for weights).
INSTANTIATE = {"lenet5.fuse", "resnet_basic_block.fuse", "efficientnet_mbconv.fuse"}
TOKEN = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|[0-9]+\.[0-9]*(?:[eE][+-]?[0-9]+)?|[0-9]+|->|//|[=!<>]=|\n[ \t]*|\S")
NUMBERS = ["0", "-1", "1e999", "1e-999", "0.5", str(2**31), str(2**63 - 1), str(2**63), "9" * 5000, "100000000"]
INSERTS = [
    *("model input let block module forward init activations if else return not and or None True".split()),
    *(":", "*", "->", "(", ")", ",", "=", "[", "]", "+", "//", "\n", "\n    ", "\n        ", '"s"', "'\r'", "#"),
    *("x self nn class lambda block_2 run_kernels activation_dtype use_cuda_graphs conv3x3 bn relu add".split()),
]
SECONDS = 60  # a build of the largest shipped spec takes a few seconds on a CI core

mutation = st.tuples(
    st.sampled_from("delete duplicate swap replace number insert".split()), st.floats(0, 1), st.integers(0, 2**16)
)


def mutate(text: str, mutations: list) -> str:
    tokens = TOKEN.findall(text)
    for kind, where, choice in mutations:
        numbers = [k for k, t in enumerate(tokens) if t[0].isdigit()]
        if not tokens or (kind == "number" and not numbers):
            continue
        i = min(int(where * len(tokens)), len(tokens) - 1)
        if kind == "delete":
            del tokens[i]
        elif kind == "duplicate":
            tokens.insert(i, tokens[i])
        elif kind == "swap":
            j = choice % len(tokens)
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif kind == "replace":
            tokens[i] = tokens[choice % len(tokens)]
        elif kind == "number":
            tokens[numbers[choice % len(numbers)]] = NUMBERS[choice % len(NUMBERS)]
        else:
            tokens.insert(i, INSERTS[choice % len(INSERTS)])
    out = []
    for token in tokens:
        out.append(token if token.startswith("\n") or not out or out[-1].startswith("\n") else " " + token)
    return "".join(out)


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def interrupt(signum, frame):
        raise Hang(f"no answer in {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def build(spec: Path, out_dir: Path) -> tuple[int, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), time_limit(SECONDS):
        code = cli.main(["build", str(spec), "--out-dir", str(out_dir)])
    return code, stderr.getvalue()


def instantiate(path: Path) -> None:
    spec = importlib.util.spec_from_file_location(f"fuzzed_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with torch.device("meta"):
        module.ModelNew()


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="the hang guard needs SIGALRM")
@settings(
    max_examples=100, phases=[Phase.explicit, Phase.reuse, Phase.generate], suppress_health_check=list(HealthCheck)
)
@given(name=st.sampled_from(sorted(SPECS)), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_a_mutated_spec_builds_or_is_one_positioned_error(name, mutations):
    text = mutate(SPECS[name], mutations)
    with tempfile.TemporaryDirectory() as tmp:
        spec, out_dir = Path(tmp) / name, Path(tmp) / "out"
        spec.write_text(text, encoding="utf-8")
        code, stderr = build(spec, out_dir)
        written = sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []
        event("built" if code == 0 else "refused")
        if code == 0:
            assert written == [f"{spec.stem}.py"], written
            source = (out_dir / written[0]).read_text(encoding="utf-8")
            compile(source, written[0], "exec")
            if name in INSTANTIATE:
                instantiate(out_dir / written[0])
            return
        assert code == 2, stderr
        assert written == [], written
        errors = [line for line in stderr.splitlines() if ": error: " in line]
        assert len(errors) == 1 and re.match(rf"{re.escape(str(spec))}:\d+:\d+: error: ", errors[0]), stderr
        assert "Traceback" not in stderr
