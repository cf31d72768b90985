#!/usr/bin/env bash
# Mutation testing of the physics core and the phase reconstructors (issue 18 part 6) with
# mutmut 3, in a scratch copy outside the checkout. Companion of run_mutmut.sh (quantifiers).
#
#   pip install 'mutmut>=3.8,<4'
#   bash tests/mutation/run_mutmut_physics.sh physics          # constants grid optics coherence propagation
#   bash tests/mutation/run_mutmut_physics.sh reconstructors   # builtin/reconstructors.py + Pelz ssb dpc common virtual
#   bash tests/mutation/run_mutmut_physics.sh potentials       # potentials.py rotation.py
#   bash tests/mutation/run_mutmut_physics.sh extra            # multislice.py stem.py + Ren prox.py model.py
#   bash tests/mutation/run_mutmut_physics.sh tracing          # analysis/atom_tracing.py (the 3D atom tracer)
#   (at a high load stop it and run the rest with tests/mutation/recheck.py --direct; docs/testing.md)
#   MUTMUT_ONLY=optics bash tests/mutation/run_mutmut_physics.sh physics     # one module of a group
#   MUTMUT_PATTERNS='*spatial_envelope*' bash tests/mutation/run_mutmut_physics.sh physics  # some functions
#   MUTMUT_REV=HEAD bash tests/mutation/run_mutmut_physics.sh extra   # the committed version, not the working tree
#   MUTMUT_ONLY=common MUTMUT_TESTS='tests/plugins/pelz2022/test_pelz_energy_geometry.py ...' \
#       bash tests/mutation/run_mutmut_physics.sh reconstructors   # a narrower (faster, weaker) selection
#
# Each group is its own scratch project, $MUTMUT_WORKDIR/<group> (default
# /tmp/tembench_mutmut_physics/<group>), with the packages tembench, tembench_pelz2022 and
# tembench_ren2020 side by side under src/ (one mutmut source root, so the plugin modules are
# mutated too), the tests, the scenarios and a setup.cfg of its own: the checkout gets neither
# mutmut config nor mutants/. mutmut puts mutants/src first on sys.path; the editable install's
# finder (which maps the three packages to the checkout) is appended to sys.meta_path, so it is
# consulted only after sys.path and the mutated copies are the ones imported — the plugins'
# entry points (tembench_pelz2022.plugin, ...) are resolved by import name, so they load the
# mutated copies as well. The script checks this before the run (import paths printed). To see a
# mutant fail a test by hand: cd <workdir>/mutants && MUTANT_UNDER_TEST=<name> PYTHONPATH=src pytest <test>
#
# Not mutated: the numba kernels. mutmut 3 replaces each function by a trampoline, which numba
# cannot compile; it leaves decorated functions alone (@njit, @lru_cache, @property are never
# mutated), and the kernel-only modules tembench_pelz2022/_kernels.py and eer_ops.py are in no
# group. Each mutant runs only the tests of the group's selection that execute the mutated
# function (mutmut's per-function map), on MUTMUT_JOBS processes (default 1: the machine is
# shared; use 2 when `uptime` shows a load below 3). Mutants that mutmut marks "suspicious" (an
# unusual exit code of the forked test run, seen with numba in a forked child) are re-run in a
# fresh process and get the verdict of that run. The per-module summary is printed at the end
# and kept in <workdir>/summary.txt, every verdict in results.txt, and one line per survivor
# (original || mutated) in survivors.diff. New tests are checked against the survivors without a
# second run by tests/mutation/recheck.py (see there). Delete the scratch folder when done:
# rm -rf /tmp/tembench_mutmut_physics
set -euo pipefail
GROUP=${1:-physics}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BASE=${MUTMUT_WORKDIR:-/tmp/tembench_mutmut_physics}
WORK=$BASE/$GROUP
JOBS=${MUTMUT_JOBS:-1}
ONLY=${MUTMUT_ONLY:-}
read -r -a PATTERNS <<< "${MUTMUT_PATTERNS:-}"

P=src/tembench/physics
T=tests/physics
case "$GROUP" in
  physics)
    modules=($P/constants.py $P/grid.py $P/optics.py $P/coherence.py $P/propagation.py)
    tests=($T/test_constants_optics.py $T/test_envelopes.py $T/test_rotation_coherence.py
           $T/test_propagation_multislice.py tests/plugins/pelz2022/test_pelz_energy_geometry.py
           $T/test_physics_mutation_gaps.py) ;;
  reconstructors)
    modules=(src/tembench/builtin/reconstructors.py src/tembench_pelz2022/common.py
             src/tembench_pelz2022/virtual.py src/tembench_pelz2022/dpc.py src/tembench_pelz2022/ssb.py)
    tests=(tests/plugins/pelz2022 tests/core/test_builtin_components.py
           tests/builtin/test_builtin_mutation_gaps.py tests/plugins/pelz2022/test_pelz_mutation_gaps.py) ;;
  potentials)
    modules=($P/potentials.py $P/rotation.py)
    tests=($T/test_potentials.py $T/test_scattering_factors.py $T/test_rotation_coherence.py
           $T/test_fast_potential.py $T/test_physics_v2.py $T/test_fast_paths.py $T/test_forward_multislice.py $T/test_stem.py $T/test_physics_mutation_gaps.py
           --deselect=$T/test_fast_paths.py::test_wisdom_planner_gives_the_same_bits_in_every_process
           --deselect=$T/test_stem.py::test_patterns_match_abtem) ;;
  extra)
    modules=($P/multislice.py $P/stem.py src/tembench_ren2020/prox.py src/tembench_ren2020/model.py)
    # tests/plugins/ren2020/test_ren_scenario.py (a whole runner scenario, minutes) is left out: slow, and
    # it failed unmutated in the scratch copy of 7f8edba, which stops mutmut before it starts
    tests=($T/test_propagation_multislice.py $T/test_stem.py $T/test_stem_mutation_gaps.py $T/test_stem4d_jitter.py
           $T/test_forward_multislice.py $T/test_physics_v2.py $T/test_physics_mutation_gaps.py
           tests/plugins/ren2020/test_ren_model.py tests/plugins/ren2020/test_ren_prox.py
           tests/plugins/ren2020/test_ren_mutation_gaps.py --deselect=$T/test_stem.py::test_patterns_match_abtem) ;;
  tracing)
    # analysis/atom_tracing.py (the tracer and its scoring helpers) with the tests that run the real tracer;
    # run_mutmut.sh covers it too, but without MUTMUT_REV / MUTMUT_TESTS / the plugin packages
    modules=(src/tembench/analysis/atom_tracing.py)
    tests=(tests/builtin/test_atom_tracing.py tests/builtin/test_atom_tracing_mutation_gaps.py
           tests/builtin/test_scoring_rules.py tests/builtin/test_builtin_mutation_gaps.py
           tests/plugins/you2025/test_tomo_scores.py) ;;
  *) echo "unknown group '$GROUP' (physics | reconstructors | potentials | extra | tracing)" >&2; exit 2 ;;
esac
# MUTMUT_TESTS='tests/a.py tests/b.py' replaces the group's test selection (a faster, weaker run)
if [[ -n "${MUTMUT_TESTS:-}" ]]; then read -r -a tests <<< "$MUTMUT_TESTS"; fi

case "$BASE" in "$ROOT"|"$ROOT"/*) echo "MUTMUT_WORKDIR must be outside the checkout" >&2; exit 2;; esac
rm -rf "$WORK"
mkdir -p "$WORK/src"
# MUTMUT_REV=<commit>: mutate and test that commit (git archive) instead of the working tree, e.g.
# while someone else edits a file; the commit is recorded in $WORK/source.txt
SRC=$ROOT
if [[ -n "${MUTMUT_REV:-}" ]]; then
  SRC=$WORK/.rev
  mkdir -p "$SRC"
  git -C "$ROOT" archive "$MUTMUT_REV" platform plugins tests scenarios | tar -x -C "$SRC"
  echo "commit $(git -C "$ROOT" rev-parse "$MUTMUT_REV")" > "$WORK/source.txt"
else
  echo "working tree of $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo '?') (uncommitted edits included)" > "$WORK/source.txt"
fi
cp -r "$SRC/platform/tembench" "$WORK/src/tembench"
for pkg in "$SRC"/plugins/tembench_*/; do cp -r "$pkg" "$WORK/src/"; done
cp -r "$SRC/tests" "$WORK/tests"
cp -r "$SRC/scenarios" "$WORK/scenarios"
rm -rf "$WORK/.rev"
find "$WORK" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$WORK/tests/mutation"
# pytest settings (markers, addopts) without the packaging sections
python "$ROOT/tests/mutation/pytest_ini.py" "$ROOT/pyproject.toml" "$WORK/pytest.ini"

only=""
for m in "${modules[@]}"; do
  if [[ -z "$ONLY" || "$m" == *$ONLY* ]]; then only+="    $m"$'\n'; fi
done
selection=""
for t in "${tests[@]}"; do
  if [[ "$t" == -* || -e "$WORK/$t" ]]; then selection+="    $t"$'\n'; fi
done
cat > "$WORK/setup.cfg" <<EOF
[mutmut]
source_paths = src
also_copy =
    scenarios
only_mutate =
$only
do_not_mutate =
    src/tembench_pelz2022/_kernels.py
    src/tembench_pelz2022/eer_ops.py
pytest_add_cli_args = -p no:cacheprovider -q
pytest_add_cli_args_test_selection =
$selection
mutate_only_covered_lines = false
use_git_change_detection = false
EOF

cd "$WORK"
export PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1
# the copies under src/ (mutants/src during the run) must shadow the editable install
PYTHONPATH=src python -c "
import tembench, tembench_pelz2022, tembench_ren2020
for m in (tembench, tembench_pelz2022, tembench_ren2020):
    print('imports', m.__name__, 'from', m.__file__)
    assert m.__file__.startswith('$WORK/src/'), 'the checkout would be tested, not the mutants'
"
start=$(date +%s)
mutmut run --max-children "$JOBS" "${PATTERNS[@]}" > run.log 2>&1 || { tail -c 2000 run.log; }
echo "mutmut run: $(( $(date +%s) - start )) s" > timing.txt
mutmut results --all true 2>&1 | grep -v ': not checked$' > results.txt || true

# re-run each "suspicious" mutant's tests in a fresh process; its exit code is the verdict
python - <<'PY'
import json, os, re, subprocess, sys
stats = json.load(open("mutants/mutmut-stats.json"))["tests_by_mangled_function_name"]
out = []
for line in open("results.txt").read().splitlines():
    m = re.match(r"\s*(\S+): suspicious$", line)
    if m:
        name = m.group(1)
        tests = sorted(stats.get(re.sub(r"__mutmut_\d+$", "", name), []))
        env = dict(os.environ, MUTANT_UNDER_TEST=name, PYTHONPATH="src")
        rc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                            cwd="mutants", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        line = f"    {name}: " + {0: "survived", 1: "killed"}.get(rc, "suspicious")
        print("re-checked:", line.strip())
    out.append(line)
open("results.txt", "w").write("\n".join(out) + "\n")
PY

# one line per survivor, read from the mutated sources: "name [verdict]: - original || + mutated"
python "$ROOT/tests/mutation/survivors.py" results.txt > survivors.diff

python - <<'PY' | tee summary.txt
import collections, re
per = collections.defaultdict(collections.Counter)
for line in open("results.txt"):
    m = re.match(r"\s*(\S+?)\.x[ǁ_]\S*__mutmut_\d+: (\w[\w ]*)$", line)
    if m:
        per[m.group(1)][m.group(2).strip()] += 1
grand = collections.Counter()
for mod, counts in sorted(per.items()):
    grand.update(counts)
    total = sum(counts.values())
    killed = counts.get("killed", 0) + counts.get("timeout", 0) + counts.get("segfault", 0)
    print(f"{mod:40s} {dict(counts)}  score {killed}/{total} = {100 * killed / max(total, 1):.1f} %")
total = sum(grand.values())
killed = grand.get("killed", 0) + grand.get("timeout", 0) + grand.get("segfault", 0)
if total:
    print(f"mutation score: {killed}/{total} = {100 * killed / total:.1f} % killed (timeouts count as killed)")
PY
cat timing.txt
