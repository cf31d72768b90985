#!/usr/bin/env bash
# Mutation testing of the quantifier modules (issue 18 part 6) with mutmut 3, in a scratch copy.
#
#   pip install 'mutmut>=3.8,<4'
#   bash tests/mutation/run_mutmut.sh                 # all four modules, ~1 h on 2 busy cores
#   MUTMUT_ONLY=quantifiers_spectral bash tests/mutation/run_mutmut.sh      # one module (glob on the file name)
#   MUTMUT_ONLY=analysis MUTMUT_PATTERNS='*match_sites* *classify_species* *gaussian_intersection*' \
#       bash tests/mutation/run_mutmut.sh           # only mutants of these functions (fnmatch on mutant names)
#
# mutmut 3 reads its configuration only from setup.cfg / pyproject.toml and works in ./mutants/,
# so this script builds a scratch project (default /tmp/tembench_mutmut, MUTMUT_WORKDIR to
# change) with the package at src/tembench, the tests and a setup.cfg of its own: the checkout
# gets neither mutmut config nor mutants/. Only the four quantifier modules are mutated; each
# mutant runs only the tests of the selection below that execute the mutated function (mutmut's
# coverage map), on MUTMUT_JOBS (default 2) processes. The result summary is printed at the end
# and kept in $MUTMUT_WORKDIR/results.txt, the survivors' diffs in survivors.diff (`cd $MUTMUT_WORKDIR
# && mutmut show <name>` shows one). Delete the scratch folder when done.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${MUTMUT_WORKDIR:-/tmp/tembench_mutmut}
JOBS=${MUTMUT_JOBS:-2}
ONLY=${MUTMUT_ONLY:-}
read -r -a PATTERNS <<< "${MUTMUT_PATTERNS:-}"

case "$WORK" in "$ROOT"|"$ROOT"/*) echo "MUTMUT_WORKDIR must be outside the checkout" >&2; exit 2;; esac
rm -rf "$WORK"
mkdir -p "$WORK/src"
cp -r "$ROOT/platform/tembench" "$WORK/src/tembench"
cp -r "$ROOT/tests" "$WORK/tests"
find "$WORK" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$WORK/tests/mutation"
# pytest settings (markers, addopts) without the packaging sections
python "$ROOT/tests/mutation/pytest_ini.py" "$ROOT/pyproject.toml" "$WORK/pytest.ini"

modules=(src/tembench/builtin/quantifiers.py src/tembench/builtin/quantifiers_spectral.py
         src/tembench/builtin/atom_tracing.py src/tembench/analysis/atom_tracing.py)
only=""
for m in "${modules[@]}"; do
  if [[ -z "$ONLY" || "$m" == *$ONLY* ]]; then only+="    $m"$'\n'; fi
done
cat > "$WORK/setup.cfg" <<EOF
[mutmut]
source_paths = src
only_mutate =
$only
pytest_add_cli_args = -p no:cacheprovider -q
pytest_add_cli_args_test_selection =
    tests/builtin/test_scoring_rules.py
    tests/builtin/test_atom_tracing.py
    tests/builtin/test_quantifiers_spectral.py
    tests/core/test_builtin_components.py
mutate_only_covered_lines = false
use_git_change_detection = false
EOF

cd "$WORK"
# the editable install maps `tembench` to the checkout; mutmut puts mutants/src first on sys.path
export PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1
mutmut run --max-children "$JOBS" "${PATTERNS[@]}" > run.log 2>&1 || { tail -c 2000 run.log; }
mutmut results --all true 2>&1 | grep -v ': not checked$' > results.txt || true
# the diff of every survivor, for review
grep -E ': survived$' results.txt | sed 's/:.*//' | while read -r name; do mutmut show "$name"; echo; done \
  > survivors.diff 2>&1 || true
python - <<'EOF'
import collections, re
counts = collections.Counter()
for line in open("results.txt"):
    m = re.match(r"\s*(\S+): (\w[\w ]*)$", line)
    if m:
        counts[m.group(2).strip()] += 1
total = sum(counts.values())
killed = counts.get("killed", 0) + counts.get("timeout", 0) + counts.get("segfault", 0)
print(dict(counts))
if total:
    print(f"mutation score: {killed}/{total} = {100 * killed / total:.1f} % killed (timeouts count as killed)")
EOF
