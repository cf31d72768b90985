"""``tembench`` command line: run, validate, list, report, compare, cache info/prune.

Every :class:`~tembench.errors.TembenchError` is printed as one paragraph on stderr with exit
status 2; nothing is written before a scenario has been validated in full.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from tembench.errors import TembenchError


#: exit status when the run finished but some units failed (bad input is 2, an interrupt 130)
EXIT_UNITS_FAILED = 1


def _check_out(out: str | None) -> None:
    if out is not None:  # refused before the plan is printed; the runner checks it again
        from tembench.store import check_output_folder

        check_output_folder(out, "--out")


def _load(args):
    from tembench.scenario import check_scenario_path, load_scenario

    check_scenario_path(args.scenario)  # a mistyped path is answered before any plugin loads
    from tembench.registry import get_registry

    registry = get_registry()
    scenario = load_scenario(args.scenario, registry, max_points=args.max_points,
                             check_resources=not getattr(args, "ignore_memory_estimate", False),
                             executor=getattr(args, "executor", None), workers=getattr(args, "workers", None))
    return registry, scenario


def _cmd_run(args) -> int:
    from tembench.runner import run_scenario

    _check_out(args.out)
    registry, scenario = _load(args)
    print(scenario.summary(), file=sys.stderr)
    result = run_scenario(scenario, out=args.out, run_id=args.run_id, executor=scenario.executor,
                          workers=scenario.workers, use_cache=not args.no_cache, progress=not args.quiet,
                          report=not args.no_report, track_memory=not args.no_memory, registry=registry)
    print(f"run folder: {result.run_dir}")
    for name in ("results.parquet", "results.csv", "report.html", "report.md"):
        if (result.run_dir / name).exists():
            print(f"  {result.run_dir / name}")
    print(f"units: {result.n_units} total, {result.n_computed} computed now, {result.n_units - result.n_computed} "
          f"already done; failed units: {result.n_errors} of {result.n_units}")
    return EXIT_UNITS_FAILED if result.n_errors else 0


def _cmd_validate(args) -> int:
    _, scenario = _load(args)
    print(f"{args.scenario}: valid")
    print(scenario.summary())
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _cmd_list(args) -> int:
    from tembench.registry import HOOK_OF_KIND, get_registry

    registry = get_registry()
    kinds = [args.kind] if args.kind else list(HOOK_OF_KIND)
    for kind in kinds:
        comps = registry.components(kind)
        print(f"{kind.replace('_', ' ')}s ({len(comps)}):")
        for name, cls in sorted(comps.items()):
            io = ""
            if kind == "forward_model":
                io = f" → {cls.produces}"
            elif kind in ("noise_model", "reconstructor", "quantifier"):
                io = f" [{', '.join(cls.accepts)}" + (f" → {cls.produces}" if getattr(cls, "produces", None) else "") + "]"
            reason = cls.unavailable_reason() if hasattr(cls, "unavailable_reason") else None
            flag = f"  [{reason}]" if reason else ""
            print(f"  {name}{io}  (plugin {registry.origin(kind, name)}, v{cls.version}){flag}")
            print(textwrap.indent(textwrap.fill(cls.describe(), 96), "      "))
            if args.verbose:
                for pname, field in cls.Params.model_fields.items():
                    if field.is_required():
                        default = "required"
                    elif field.default_factory is not None:
                        default = f"default {field.default_factory()!r}"
                    else:
                        default = f"default {field.default!r}"
                    desc = f" — {field.description}" if field.description else ""
                    print(f"        {pname}: {type_name(field.annotation)}, {default}{desc}")
                _print_metrics(cls)
        print()
    # a plugin that failed to load was reported once, by the registry, when it was loaded
    return 0


def _print_metrics(cls) -> None:
    """The metrics a component declares (``tembench.metrics.Metric``): unit, direction, range, role."""
    from tembench.metrics import declared_metrics

    metrics = declared_metrics(cls)
    if not metrics:
        if cls.kind == "quantifier":
            print("      metrics: none declared (shown without unit or direction, left out of the verdict)")
        return
    print("      metrics:")
    for key, m in metrics.items():
        desc = f" — {m.description}" if m.description else ""
        print(textwrap.fill(f"{key}: {m.summary()}{desc}", 110, initial_indent="        ",
                            subsequent_indent="            "))


def type_name(annotation) -> str:
    """Readable parameter type: ``float | None``, ``one of 'fresnel' | 'exact'``, ``tuple[int, int, int]``."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is not None and args:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args if a is not Ellipsis)}{', ...' if Ellipsis in args else ''}]"
    return getattr(annotation, "__name__", str(annotation))


def _cmd_report(args) -> int:
    from tembench.report import render_report

    md, html = render_report(Path(args.run))
    print(md)
    print(html)
    return 0


def _cmd_compare(args) -> int:
    import pandas as pd

    from tembench.report import compare

    pairs = {}
    for item in args.pair or []:
        a_label, sep, b_label = item.partition("=")
        if not sep or not a_label or not b_label:
            raise TembenchError(f"--pair expects A_LABEL=B_LABEL (a reconstructor of each run), got {item!r}")
        pairs[a_label] = b_label
    table = compare(args.run_a, args.run_b, pairs)
    with pd.option_context("display.max_rows", 500, "display.max_columns", 50, "display.width", 200):
        print(f"A = {args.run_a}\nB = {args.run_b}")
        for a_label, b_label in table.attrs.get("paired", {}).items():
            print(f"paired: {a_label} (A) with {b_label} (B)")
        print(table.to_string(float_format=lambda x: f"{x:.4g}"))
    return 0


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0, got {text!r}")
    return value


def _cache_root(text: str) -> Path:
    root = Path(text)
    if not root.is_dir():
        raise TembenchError(f"cache root {text!r} is not a folder; give an output folder (e.g. reports/<scenario>) "
                            "or the folder holding several of them (default: reports)")
    return root


def _cmd_cache_info(args) -> int:
    from tembench.cache import cache_info

    print(cache_info(_cache_root(args.root)))
    return 0


def _cmd_cache_prune(args) -> int:
    from tembench.cache import prune, prune_summary

    root = _cache_root(args.root)
    max_bytes = None if args.max_size is None else args.max_size * 2**30
    doomed, before, after = prune(root, args.older_than, max_bytes, dry_run=args.dry_run)
    print(prune_summary(root, doomed, before, after, args.dry_run))
    if args.dry_run:
        for it in doomed:
            print(f"  {it.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tembench", description="TEM phase-contrast & 3D reconstruction benchmarks")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run (or resume) a scenario")
    r.add_argument("scenario", help="scenario YAML file")
    r.add_argument("--out", help="output folder (default: the scenario's `output`, else reports/<name>)")
    r.add_argument("--run-id", help="run folder name (default: derived from the scenario's content)")
    r.add_argument("--executor", choices=["serial", "processes", "dask"], help="override the scenario's executor")
    r.add_argument("--workers", type=_positive_int, help="workers for the processes or dask executor (≥ 1)")
    r.add_argument("--max-points", type=_positive_int, help="refuse sweeps larger than this (default 10 000)")
    r.add_argument("--ignore-memory-estimate", action="store_true",
                   help="run even where the pre-run memory estimate says a stage will not fit")
    r.add_argument("--no-cache", action="store_true", help="recompute every stage (rows already written are kept)")
    r.add_argument("--no-report", action="store_true", help="skip rendering report.html/report.md")
    r.add_argument("--no-memory", action="store_true", help="skip tracemalloc peak-memory tracking")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_run)

    v = sub.add_parser("validate", help="validate a scenario and print what would run")
    v.add_argument("scenario")
    v.add_argument("--executor", choices=["serial", "processes", "dask"], help="the executor the run will use")
    v.add_argument("--workers", type=_positive_int, help="workers for the processes or dask executor (≥ 1)")
    v.add_argument("--max-points", type=_positive_int, help="refuse sweeps larger than this (default 10 000)")
    v.add_argument("--ignore-memory-estimate", action="store_true", help="skip the pre-run memory estimate")
    v.set_defaults(func=_cmd_validate)

    ls = sub.add_parser("list", help="list every registered component")
    ls.add_argument("--kind", choices=["sample", "forward_model", "noise_model", "reconstructor", "quantifier"])
    ls.add_argument("-v", "--verbose", action="store_true", help="show every parameter")
    ls.set_defaults(func=_cmd_list)

    rep = sub.add_parser("report", help="render report.md / report.html for a run folder")
    rep.add_argument("run")
    rep.set_defaults(func=_cmd_report)

    c = sub.add_parser("compare", help="put two runs side by side")
    c.add_argument("run_a")
    c.add_argument("run_b")
    c.add_argument("--pair", action="append", metavar="A_LABEL=B_LABEL",
                   help="match reconstructor A_LABEL of run A with B_LABEL of run B (repeatable); two single-method "
                        "runs with different labels are paired automatically")
    c.set_defaults(func=_cmd_compare)

    ca = sub.add_parser("cache", help="show or prune the stage cache (the .cache folders of output folders)")
    csub = ca.add_subparsers(dest="cache_command", required=True)
    ci = csub.add_parser("info", help="entries and size per scenario and stage")
    ci.add_argument("root", nargs="?", default="reports",
                    help="an output folder, or a folder of output folders (default: reports)")
    ci.set_defaults(func=_cmd_cache_info)
    cp = csub.add_parser("prune", help="remove cache entries by age and/or total size (only under .cache/; rows, "
                                       "results tables, manifests and reports are never touched); old pickle "
                                       "entries and abandoned temp folders are always removed")
    cp.add_argument("root", nargs="?", default="reports",
                    help="an output folder, or a folder of output folders (default: reports)")
    cp.add_argument("--older-than", type=_nonnegative_float, metavar="DAYS",
                    help="remove entries not used for this many days")
    cp.add_argument("--max-size", type=_nonnegative_float, metavar="GB",
                    help="then remove the least recently used entries until the cache holds at most GB GiB")
    cp.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    cp.set_defaults(func=_cmd_cache_prune)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TembenchError as exc:
        print(f"tembench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tembench: interrupted; finished rows are kept — run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
