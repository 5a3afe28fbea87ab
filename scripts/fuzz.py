"""Coverage-guided fuzzing of every parser of untrusted bytes (atheris: libFuzzer for Python).

    .venv/bin/python -m scripts.fuzz --list
    .venv/bin/python -m scripts.fuzz TARGET --runs 1000000 [--corpus DIR] [--seed N]
    .venv/bin/python -m scripts.fuzz TARGET --replay FILE...

The targets, their entry points and the errors each may raise are in ``scripts.fuzz_targets``.
A run seeds the corpus directory (default ``/var/tmp/keylease-fuzz/TARGET``) with the target's
seeds when it is empty, then libFuzzer runs the target ``--runs`` times in a child interpreter
whose ``agent``, ``kbs`` and ``keylease`` modules are instrumented for coverage as they are
imported. A crash is any exception other than the target's own error classes, an input that
takes longer than ``--timeout`` seconds, or a fault in native code; libFuzzer stops at the first
and writes the input to ``crashes/TARGET/``. Then the script prints the runs, runs per second,
libFuzzer's coverage (``cov``: edges, ``ft``: features) and corpus size, and the line coverage
of the modules under test after replaying the corpus. Exit status 0 only without a crash.

``--replay`` runs inputs (e.g. a crash file) through the target once each, without the fuzzer,
and shows the traceback of any that escapes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

DEFAULT_WORK = Path("/var/tmp/keylease-fuzz")  # noqa: S108 (corpora outlive a reboot)
INSTRUMENTED = ["agent", "kbs", "keylease"]
_STATUS = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+) corp: (\d+)/")


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("target", nargs="?", help="the fuzz target (--list shows them)")
    p.add_argument("--list", action="store_true", help="list the targets")
    p.add_argument("--runs", type=int, default=10_000, help="inputs to run (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="libFuzzer's random seed (0: random)")
    p.add_argument("--corpus", type=Path, help=f"corpus directory (default {DEFAULT_WORK}/T)")
    p.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    p.add_argument("--replay", type=Path, nargs="+", metavar="FILE", help="run these inputs")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-coverage", action="store_true", help=argparse.SUPPRESS)
    rest = argv[argv.index("--") + 1 :] if "--" in argv else []  # the child's libFuzzer arguments
    args = p.parse_args(argv[: len(argv) - len(rest) - (1 if "--" in argv else 0)])
    args.libfuzzer = rest
    return args


def main(argv: list[str] | None = None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    if args.list:
        from scripts.fuzz_targets import TARGETS

        for name, target in TARGETS.items():
            print(f"{name:16} {target.run.__name__} -> {', '.join(target.modules)}")
        return 0
    if not args.target:
        print("fuzz: name a target (--list shows them)", file=sys.stderr)
        return 2
    if args.child:
        return _fuzz_child(args.target, args.libfuzzer)
    if args.child_coverage:
        return _coverage_child(args.target, Path(args.libfuzzer[0]))
    if args.replay:
        return _replay(args.target, args.replay)
    return _run(args)


# --- the parent: corpus, child run, report -------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    corpus = args.corpus or DEFAULT_WORK / args.target
    crashes = corpus.parent / "crashes" / args.target
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="keylease-fuzz-", dir="/dev/shm"))
    env = dict(
        os.environ, TSS2_LOG="all+none", PYTHONHASHSEED="0", KEYLEASE_FUZZ_SCRATCH=str(scratch)
    )
    try:
        return _fuzz(args, corpus, crashes, env)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _fuzz(args: argparse.Namespace, corpus: Path, crashes: Path, env: dict[str, str]) -> int:
    if not any(corpus.iterdir()):
        _seed(args.target, corpus, env)
    me = [sys.executable, "-m", "scripts.fuzz", args.target]
    libfuzzer = [
        f"-runs={args.runs}", f"-seed={args.seed}", f"-timeout={args.timeout}",
        f"-max_len={_max_len(args.target, env)}", "-rss_limit_mb=4096", "-print_final_stats=1",
        f"-artifact_prefix={crashes}/", str(corpus),
    ]  # fmt: skip
    print(f"fuzz {args.target}: {args.runs} runs, corpus {corpus} ({_count(corpus)} inputs)")
    start = time.monotonic()
    child = subprocess.Popen(
        [*me, "--child", "--", *libfuzzer], stderr=subprocess.PIPE, text=True, env=env
    )
    assert child.stderr is not None
    last: tuple[str, ...] = ()
    stats: dict[str, str] = {}
    tail: list[str] = []
    for line in child.stderr:
        tail = [*tail[-60:], line.rstrip()]
        status = _STATUS.match(line)
        if status:
            last = status.groups()
            if status.group(2) in ("pulse", "DONE") or status.group(2) == "INITED":
                print(f"  #{last[0]} {last[1]} cov {last[2]} ft {last[3]} corpus {last[4]}")
        elif line.startswith("stat::"):
            key, _, value = line.partition(":")[2].partition(":")
            stats[key.strip(": ")] = value.strip()
    code = child.wait()
    seconds = time.monotonic() - start
    found = sorted(
        p.name for p in crashes.iterdir() if p.stat().st_mtime >= time.time() - seconds - 5
    )
    if code != 0 or found:
        print("\n".join(tail[-40:]))
    runs = int(stats.get("number_of_executed_units", last[0] if last else 0))
    print(f"fuzz {args.target}: {runs} runs in {seconds:.0f} s, {runs / seconds:.0f} runs/s")
    if last:
        print(f"  libFuzzer coverage: cov {last[2]} edges, ft {last[3]} features, corpus {last[4]}")
    print(
        f"  crashes: {len(found)}"
        + (f" ({', '.join(str(crashes / f) for f in found)})" if found else "")
    )
    covered = subprocess.run([*me, "--child-coverage", "--", str(corpus)], env=env, check=False,
                             capture_output=True, text=True)  # fmt: skip
    print(covered.stdout.rstrip() or covered.stderr.rstrip())
    return 0 if code == 0 and not found else 1


def _seed(target: str, corpus: Path, env: dict[str, str]) -> None:
    code = (
        "import hashlib,sys; from pathlib import Path; from scripts.fuzz_targets import TARGETS\n"
        f"for s in TARGETS[{target!r}].seeds():\n"
        f"    (Path({str(corpus)!r}) / hashlib.sha1(s).hexdigest()).write_bytes(s)\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def _max_len(target: str, env: dict[str, str]) -> int:
    code = f"from scripts.fuzz_targets import TARGETS; print(TARGETS[{target!r}].max_len)"
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return int(out.stdout)


def _count(corpus: Path) -> int:
    return sum(1 for _ in corpus.iterdir())


# --- the children: libFuzzer, and the line coverage of a corpus ----------------------------------


def _fuzz_child(name: str, libfuzzer: list[str]) -> int:
    import atheris

    with atheris.instrument_imports(include=INSTRUMENTED):
        from scripts.fuzz_targets import TARGETS
    target = TARGETS[name]

    def one(data: bytes) -> None:
        with contextlib.suppress(*target.allowed):
            target.run(data)

    atheris.Setup([sys.argv[0], *libfuzzer], one)
    atheris.Fuzz()
    return 0  # not reached: libFuzzer exits the process


def _coverage_child(name: str, corpus: Path) -> int:
    """Replay ``corpus`` under a line tracer; print the lines of each module under test that ran
    (lines inside functions only: module-level lines run at import either way)."""
    import importlib

    from scripts.fuzz_targets import TARGETS

    target = TARGETS[name]
    files = {importlib.import_module(m).__file__ or "": m for m in target.modules}
    hits: dict[str, set[int]] = {f: set() for f in files}

    def local(frame: object, event: str, arg: object) -> object:
        if event == "line":
            hits[frame.f_code.co_filename].add(frame.f_lineno)  # type: ignore[attr-defined]
        return local

    def tracer(frame: object, event: str, arg: object) -> object:
        filename = frame.f_code.co_filename  # type: ignore[attr-defined]
        if filename in hits:
            hits[filename].add(frame.f_lineno)  # type: ignore[attr-defined]
            return local
        return None

    inputs = sorted(corpus.iterdir())
    sys.settrace(tracer)  # type: ignore[arg-type]
    try:
        for path in inputs:
            with contextlib.suppress(*target.allowed):
                target.run(path.read_bytes())
    finally:
        sys.settrace(None)
    for filename, module in files.items():
        lines = _function_lines(Path(filename))
        ran = len(hits[filename] & lines)
        share = 100 * ran / max(1, len(lines))
        print(f"  line coverage {module}: {ran}/{len(lines)} lines in functions ({share:.0f}%) "
              f"over {len(inputs)} corpus inputs")  # fmt: skip
    return 0


def _function_lines(path: Path) -> set[int]:
    module = compile(path.read_text(), str(path), "exec")
    lines: set[int] = set()
    stack = [c for c in module.co_consts if hasattr(c, "co_lines")]
    while stack:
        code = stack.pop()
        lines |= {line for _, _, line in code.co_lines() if line is not None}
        lines.discard(code.co_firstlineno)  # the def line runs at import
        stack += [c for c in code.co_consts if hasattr(c, "co_lines")]
    return lines


def _replay(name: str, paths: list[Path]) -> int:
    import traceback

    from scripts.fuzz_targets import TARGETS

    target = TARGETS[name]
    failed = 0
    for path in paths:
        try:
            target.run(path.read_bytes())
        except target.allowed as exc:
            print(f"{path}: refused: {type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001 (a crash: show it and go on with the next input)
            failed += 1
            print(f"{path}: CRASH")
            traceback.print_exc()
        else:
            print(f"{path}: accepted")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
