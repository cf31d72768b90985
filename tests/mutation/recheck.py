"""Re-run the survivors of a finished mutmut run against new or changed test files.

After a run of run_mutmut_physics.sh, new tests written to kill survivors are checked without a
second full run (which would also re-run every killed mutant):

    python tests/mutation/recheck.py /tmp/tembench_mutmut_physics/potentials \\
        tests/physics/test_physics_mutation_gaps.py [more test files] [--only 'GLOB' ...]

The given test files are copied from this checkout into <workdir>/mutants/tests/ (the same relative
paths; --no-copy keeps the scratch project's own copies, those of the mutated commit), then every
mutant that results.txt lists as "survived" or "no tests" (optionally only those whose name matches
a --only glob) is activated (MUTANT_UNDER_TEST, as mutmut does) and the files'
tests are run in a forked child of a process that imported tembench once: exit 1 (a test failed)
= killed, 0 = still survived, a run over --timeout s = timeout (counts as killed, as in mutmut),
anything else (collection error ...) = error. With --status 'not checked' --sample N it also
runs a random sample of the mutants a stopped (too slow) mutmut run never reached, which estimates
the score of the rest. With --direct the test calls are first run once without a mutant, in a forked
child exactly as the mutants' run (the same order and inherited state): if that fails the tool stops —
otherwise an order-dependent test (a module-level random generator) would "kill" every mutant.
With --direct, parametrised fixtures (``params=``, read through ``request.param``) are expanded like
``parametrize``; with --map <workdir>/mutants/mutmut-stats.json (mutmut's per-function test map, e.g. from a
run with MUTMUT_PATTERNS='zz_nomatch_*', which only generates the mutants and collects the map) each mutant
runs only the test functions that execute its function, as mutmut itself does — several times faster at a
high load. --shard I/K splits the (random) list between K processes, each with its own --out; --also folds
their verdicts together afterwards. When the checkout's tests have moved on since the mutated commit, use
--no-copy for the scratch's own tests (the default copies the named test files from this checkout).
Verdicts go to <workdir>/recheck.txt (one line per mutant, "name: verdict") and the per-module table
(mutants, killed, survived, score) counting the original verdicts of results.txt with the rechecked
ones replaced is printed and kept in <workdir>/summary_rechecked.txt.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("tests", nargs="+")
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--status", default="survived,no tests",
                    help="comma-separated verdicts of results.txt to (re)run; 'not checked' runs mutants a "
                         "stopped mutmut run never reached (with --sample: a random sample of them)")
    ap.add_argument("--sample", type=int, default=0, help="run only this many of them, drawn at random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard", default="", help="I/K: run only every K-th mutant of the list from the I-th (0-based), "
                                                 "for K processes side by side (give each its own --out)")
    ap.add_argument("--results", default="results.txt",
                    help="verdict list in the workdir; for 'not checked': mutmut results --all true > all.txt")
    ap.add_argument("--out", default="recheck.txt", help="verdict file in the workdir (earlier verdicts there stand)")
    ap.add_argument("--also", action="append", default=[],
                    help="more verdict files of earlier rechecks to fold in (their verdicts stand too)")
    ap.add_argument("--direct", action="store_true",
                    help="call the test functions (module.py[::name]; parametrize and parametrised fixtures (request.param) expanded; monkeypatch, "
                         "tmp_path and plain conftest fixtures, computed once and shared) in the forked child instead of a pytest session: no pytest start-up per mutant")
    ap.add_argument("--map", default="",
                    help="with --direct: mutmut's mutants/mutmut-stats.json (of a run of the same sources and tests, e.g. "
                         "generated with MUTMUT_PATTERNS='zz_nomatch_*'): each mutant runs only the test functions that "
                         "execute its function, as mutmut does; a mutant whose function no test executes is 'no tests'")
    ap.add_argument("--pytest-arg", action="append", default=[], help="e.g. --pytest-arg=--deselect=tests/x.py::t")
    ap.add_argument("--no-copy", action="store_true",
                    help="use the scratch project's own copies of the test files (those of the mutated commit) "
                         "instead of copying them from this checkout")
    args = ap.parse_args()
    statuses = {s.strip() for s in args.status.split(",")}
    work = Path(args.workdir).resolve()
    mutants = work / "mutants"
    for t in [] if args.no_copy else args.tests:
        if not (ROOT / t.split("::")[0]).is_file():
            continue
        src = ROOT / t.split("::")[0]
        dst = mutants / t.split("::")[0]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)

    results = {}
    for line in (work / args.results).read_text().splitlines():
        m = re.match(r"\s*(\S+): (\w[\w ]*)$", line)
        if m:
            results[m.group(1)] = m.group(2).strip()
    previous = {}
    own = {}   # the verdicts of this --out file only: what it holds at the end (not the --also files', which
    rc_file = work / args.out   # would overwrite a parallel shard's newer verdicts when the files are folded)
    for f in [*(work / a for a in args.also), rc_file]:
        if f.exists():  # earlier rechecks: their verdicts stand, their survivors are tried again
            for line in f.read_text().splitlines():
                name, _, verdict = line.partition(": ")
                previous[name] = verdict
                if f == rc_file:
                    own[name] = verdict
    todo = [n for n, v in results.items()
            if previous.get(n, v) in statuses
            and (not args.only or any(fnmatch.fnmatch(n, g) for g in args.only))]
    if args.sample:
        import random

        # random order: a stopped run is a random sample. The order is drawn over results.txt's verdicts alone
        # (earlier rechecks only drop the mutants they already ran), so a run continued with --also, or split
        # with --shard, goes on in the order of the first run with the same seed
        pool = [n for n, v in results.items()
                if v in statuses and (not args.only or any(fnmatch.fnmatch(n, g) for g in args.only))]
        keep = set(todo)
        todo = [n for n in random.Random(args.seed).sample(pool, min(args.sample, len(pool))) if n in keep]
    if args.shard:
        i, k = (int(v) for v in args.shard.split("/"))
        todo = todo[i::k]

    os.chdir(mutants)
    sys.path.insert(0, str(mutants / "src"))
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    import numpy  # noqa: F401  (imported once; every child inherits it)
    import pytest
    import tembench  # noqa: F401
    import tembench.physics  # noqa: F401
    import scipy.ndimage, scipy.fft, scipy.special  # noqa: F401,E401  (test modules' heavy imports, once)
    assert tembench.__file__.startswith(str(mutants / "src")), tembench.__file__
    # one unmutated run in this process first: the tests must pass, and every child inherits the
    # imported test modules, compiled numba kernels, FFT plans and session-wide caches
    os.environ.pop("MUTANT_UNDER_TEST", None)
    # with --direct the unmutated check is the direct run itself (below): pytest only imports the modules
    # here, since a -k-like subset of a module with a module-level random generator can fail in pytest
    # yet pass in the full file (or the other way round)
    base = pytest.main(["-q", "-p", "no:cacheprovider", *(["--collect-only"] if args.direct else []),
                        *args.pytest_arg, *args.tests])
    if base != 0:
        sys.exit(f"the tests fail without a mutant (pytest exit {base}); fix them first")

    calls = []
    if args.direct:  # the test functions, resolved once in this process (pytest imported the modules above)
        import importlib.util
        import itertools

        supported = {"monkeypatch", "tmp_path"}
        fixtures = {}

        def fixture_def(name, folder, mod=None):
            """The fixture object ``name`` of the test module or of a conftest.py above it."""
            for d in [folder, *folder.parents]:
                conf = next((m for m in list(sys.modules.values()) if getattr(m, "__file__", None)
                             and os.path.abspath(m.__file__) == str(d / "conftest.py")), None)
                fx = getattr(mod, name, None) if d == folder and mod is not None else None
                if not hasattr(fx, "_get_wrapped_function"):
                    fx = getattr(conf, name, None) if conf is not None else None
                if fx is not None and hasattr(fx, "_get_wrapped_function"):
                    return fx
                if d == Path.cwd():
                    break
            raise LookupError(name)

        def fixture_params(name, folder, mod=None):
            """The ``params`` of a parametrised fixture (``request.param``), or None."""
            try:
                marker = getattr(fixture_def(name, folder, mod), "_fixture_function_marker", None)
            except LookupError:
                return None
            return list(marker.params) if marker is not None and marker.params else None

        def resolve_fixture(name, folder, mod=None, param=None):
            """Value of a fixture ``name`` (no yield; ``request`` only for ``request.param``) of the test module
            or a conftest.py above it; a parametrised fixture once per ``param``."""
            key = name if param is None else (name, repr(param))
            if key in fixtures:
                return fixtures[key]
            f = fixture_def(name, folder, mod)._get_wrapped_function()
            deps = f.__code__.co_varnames[:f.__code__.co_argcount]
            import types

            fixtures[key] = f(**{a: types.SimpleNamespace(param=param) if a == "request" else resolve_fixture(a, folder, mod)
                                 for a in deps})
            return fixtures[key]
        for t in args.tests:
            path, _, name = t.partition("::")
            mod = next((m for m in list(sys.modules.values())
                        if getattr(m, "__file__", None) and os.path.abspath(m.__file__) == os.path.abspath(path)), None)
            if mod is None:
                spec = importlib.util.spec_from_file_location(Path(path).stem, path)
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
            fns = [getattr(mod, name)] if name else [f for n, f in vars(mod).items()
                                                      if n.startswith("test_") and callable(f)]
            for fn in fns:
                marks = list(getattr(fn, "pytestmark", []))
                if any(m.name == "skipif" and m.args and m.args[0] for m in marks) or \
                        any(m.name in ("skip", "xfail", "abtem") for m in marks):
                    continue
                grids = []
                for m in marks:
                    if m.name != "parametrize":
                        continue
                    names = [n.strip() for n in (m.args[0].split(",") if isinstance(m.args[0], str) else m.args[0])]
                    rows = []
                    for v in m.args[1]:
                        v = v.values if type(v).__name__ == "ParameterSet" else v   # pytest.param(...)
                        rows.append(dict(zip(names, v if len(names) > 1 else (v,))))
                    grids.append(rows)
                params = set(fn.__code__.co_varnames[:fn.__code__.co_argcount])
                folder = Path(path).resolve().parent
                for n in sorted(params - {k for g in grids for k in g[0]} - supported):
                    values = fixture_params(n, folder, mod)   # a parametrised fixture: one call per param
                    if values is not None:
                        grids.append([{n: resolve_fixture(n, folder, mod, v)} for v in values])
                given = {n for g in grids for n in g[0]} if grids else set()
                for n in params - given - supported:   # conftest fixtures: computed once here, shared
                    try:
                        fixtures[n] = resolve_fixture(n, Path(path).resolve().parent, mod)
                    except LookupError:
                        pass
                if params - given - supported - set(fixtures):
                    print(f"direct: {fn.__name__} skipped (fixtures {sorted(params - given - supported)})")
                    continue
                for combo in itertools.product(*grids) if grids else [()]:
                    calls.append((fn, {k: v for d in combo for k, v in d.items()}, f"{path}::{fn.__name__}"))
        print(f"direct: {len(calls)} test calls per mutant", flush=True)

    def run_direct(only=None):
        import tempfile

        for fn, kwargs, test_id in calls:
            if only is not None and test_id not in only:
                continue
            kw = dict(kwargs)
            names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
            kw.update({n: fixtures[n] for n in names if n in fixtures and n not in kw})
            if "tmp_path" in names:
                kw["tmp_path"] = Path(tempfile.mkdtemp())
            if "monkeypatch" in names:
                with pytest.MonkeyPatch.context() as mp:
                    fn(monkeypatch=mp, **kw)
            else:
                fn(**kw)

    if args.direct:  # the direct calls must pass without a mutant, in a forked child as the mutants run
        pid = os.fork()
        if pid == 0:
            try:
                run_direct()
                os._exit(0)
            except BaseException:  # noqa: BLE001
                import traceback

                traceback.print_exc()
                os._exit(1)
        if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
            sys.exit("the direct test calls fail without a mutant (traceback above); fix them first")
        print("direct: the calls pass without a mutant", flush=True)

    tests_of = None
    if args.map:
        import json

        stats = json.loads(Path(args.map).read_text())["tests_by_mangled_function_name"]
        tests_of = {f: {t.split("[")[0] for t in ts} for f, ts in stats.items()}
    verdicts = dict(previous)
    t0 = time.time()
    for i, name in enumerate(todo):
        selected = None
        if tests_of is not None:
            selected = tests_of.get(re.sub(r"__mutmut_\d+$", "", name), set())
            if not any(test_id in selected for *_, test_id in calls):
                verdicts[name] = "no tests"
                with open(rc_file, "a") as fh:
                    fh.write(f"{name}: no tests\n")
                print(f"[{i + 1}/{len(todo)} {time.time() - t0:.0f} s] {name}: no tests", flush=True)
                continue
        pid = os.fork()
        if pid == 0:
            os.environ["MUTANT_UNDER_TEST"] = name
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            if args.direct:
                try:
                    run_direct(selected)
                    rc = 0
                except BaseException:  # noqa: BLE001 - any failure of a test under the mutant kills it
                    rc = 1
            else:
                rc = pytest.main(["-x", "-q", "-p", "no:cacheprovider", *args.pytest_arg, *args.tests])
            os._exit(int(rc))
        deadline = time.time() + args.timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                verdict = {0: "survived", 1: "killed"}.get(rc, "error")
                break
            if time.time() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                verdict = "timeout"
                break
            time.sleep(0.02)
        verdicts[name] = verdict
        with open(rc_file, "a") as fh:   # kept as it goes: a run stopped early keeps its verdicts
            fh.write(f"{name}: {verdict}\n")
        print(f"[{i + 1}/{len(todo)} {time.time() - t0:.0f} s] {name}: {verdict}", flush=True)
    own.update({n: verdicts[n] for n in todo if n in verdicts})
    rc_file.write_text("".join(f"{n}: {v}\n" for n, v in sorted(own.items())))

    per = collections.defaultdict(collections.Counter)
    for name, v in results.items():
        mod = re.match(r"(\S+?)\.x[ǁ_]", name)
        if mod:
            per[mod.group(1)][verdicts.get(name, v)] += 1
    lines = []
    for mod, c in sorted(per.items()):
        total = sum(c.values())
        killed = c["killed"] + c["timeout"] + c["segfault"]
        lines.append(f"{mod:40s} {dict(c)}  score {killed}/{total} = {100 * killed / max(total, 1):.1f} %")
    text = "\n".join(lines) + "\n"
    (work / "summary_rechecked.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
