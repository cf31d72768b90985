"""One line per surviving mutant, read from the mutated sources: "name [verdict]: - original || + mutated".

Usage (in a scratch project of run_mutmut_physics.sh): python survivors.py [results.txt] [recheck.txt]
— the verdicts of results.txt (mutmut results --all true), replaced by those of recheck.txt
(tests/mutation/recheck.py) if given; works while a run is still going (on a fresh `mutmut results`).
"""

import ast
import difflib
import re
import sys
from pathlib import Path

cache = {}


def functions(mod):
    if mod not in cache:
        src = (Path("mutants/src") / (mod.replace(".", "/") + ".py")).read_text()
        lines = src.splitlines()
        cache[mod] = {n.name: lines[n.lineno - 1:n.end_lineno]
                      for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef) and "__mutmut_" in n.name}
    return cache[mod]


verdicts = {}
for path in sys.argv[1:] or ["results.txt"]:
    for line in open(path):
        m = re.match(r"\s*(\S+): (\w[\w ]*)$", line)
        if m:
            verdicts[m.group(1)] = m.group(2).strip()
for name, verdict in verdicts.items():
    if verdict not in ("survived", "no tests", "suspicious", "error"):
        continue
    mod, fn = re.match(r"(.+?)\.(x[_ǁ].*)$", name).groups()
    f = functions(mod)
    a, b = f.get(re.sub(r"__mutmut_\d+$", "__mutmut_orig", fn)), f.get(fn)
    if a is None or b is None:  # methods: defined in the class under their own name
        fn = fn.split("ǁ")[-1]
        a, b = f.get(re.sub(r"__mutmut_\d+$", "__mutmut_orig", fn)), f.get(fn)
    if a is None or b is None:
        print(f"{name} [{verdict}]: (source not found)")
        continue
    a = [re.sub(r"\S*__mutmut_orig", "f", a[0])] + a[1:]
    b = [re.sub(r"\S*__mutmut_\d+", "f", b[0])] + b[1:]
    d = [x.strip() for x in difflib.unified_diff(a, b, lineterm="", n=0) if x[:1] in "+-" and x[:3] not in ("+++", "---")]
    print(f"{name} [{verdict}]: " + " || ".join(d))
