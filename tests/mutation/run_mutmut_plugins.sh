#!/usr/bin/env bash
# Mutation testing of the You 2025 and Friedrich 2023 plugins' reconstructors and quantifiers
# (issue 18 part 6) with mutmut 3, in a scratch copy outside the checkout. Companion of
# run_mutmut_physics.sh (same layout, same variables); results in tests/mutation/RESULTS_plugins.md.
#
#   pip install 'mutmut>=3.8,<4'
#   bash tests/mutation/run_mutmut_plugins.sh you2025        # msp linear_tomo e2e tomo_common tomo_scores positions
#   bash tests/mutation/run_mutmut_plugins.sh friedrich2023  # ricom ricom_recon columns stats counting quantify airpi dislocation
#   MUTMUT_ONLY=msp bash tests/mutation/run_mutmut_plugins.sh you2025      # one module of a group
#   MUTMUT_REV=HEAD ...                      # the committed version (git archive), not the working tree
#   MUTMUT_PATTERNS='zz_nomatch_*' ...       # only generate the mutants and collect mutmut's per-function
#                                            # test map (mutants/mutmut-stats.json) for recheck.py --direct --map
#   MUTMUT_TESTS='tests/a.py ...' ...        # replaces the group's test selection
#
# Test selections leave out the tests marked slow (-m "not slow") and the few unmarked ones that take
# > 5 s (deselected below), so one mutant runs in seconds; the full runs are slow on this machine, so
# the recorded scores come from a random sample run with recheck.py --direct --map (RESULTS_plugins.md).
# Not mutated: numba kernels (ricom_kernels.py), training scripts (airpi_train.py, nn_*), reports,
# the restoration noise model (restore*.py). airpi.py's JAX network functions (_conv, forward,
# init_params, conv_shapes, predict_waves, _network, require_jax) are mutated but left out of the
# sample (RESULTS_plugins.md).
set -euo pipefail
GROUP=${1:-you2025}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BASE=${MUTMUT_WORKDIR:-/tmp/tembench_mutmut_plugins}
WORK=$BASE/$GROUP
JOBS=${MUTMUT_JOBS:-1}
ONLY=${MUTMUT_ONLY:-}
read -r -a PATTERNS <<< "${MUTMUT_PATTERNS:-}"

case "$GROUP" in
  you2025)
    Y=src/tembench_you2025
    T=tests/plugins/you2025
    modules=($Y/msp.py $Y/linear_tomo.py $Y/e2e.py $Y/tomo_common.py $Y/tomo_scores.py $Y/positions.py)
    tests=($T/test_e2e.py $T/test_linear_tomo.py $T/test_tomo_common.py $T/test_tomo_scores.py
           $T/test_you_gradients.py $T/test_you_msp.py $T/test_you_mutation_gaps.py) ;;
  friedrich2023)
    F=src/tembench_friedrich2023
    T=tests/plugins/friedrich2023
    modules=($F/ricom.py $F/ricom_recon.py $F/columns.py $F/stats.py $F/counting.py $F/quantify.py
             $F/airpi.py $F/dislocation.py)
    tests=($T/test_ricom.py $T/test_column_fit.py $T/test_components.py $T/test_counting_stats.py
           $T/test_crlb.py $T/test_crlb_reference.py $T/test_dislocation.py $T/test_airpi.py $T/test_wiring.py
           $T/test_friedrich_mutation_gaps.py
           --deselect=$T/test_crlb_reference.py::test_low_dose_least_squares_fit_with_negative_expected_counts_keeps_its_bound
           --deselect=$T/test_crlb.py::test_crlb_matches_monte_carlo_of_ml_and_lsq_estimators_for_one_gaussian
           --deselect=$T/test_airpi.py::test_noise_draw_groups_and_the_loss_on_their_mean
           --deselect=$T/test_airpi.py::test_untrained_network_is_the_probe_only_baseline) ;;
  *) echo "unknown group '$GROUP' (you2025 | friedrich2023)" >&2; exit 2 ;;
esac
if [[ -n "${MUTMUT_TESTS:-}" ]]; then read -r -a tests <<< "$MUTMUT_TESTS"; fi

case "$BASE" in "$ROOT"|"$ROOT"/*) echo "MUTMUT_WORKDIR must be outside the checkout" >&2; exit 2;; esac
rm -rf "$WORK"
mkdir -p "$WORK/src"
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
# the gap tests of this checkout (they may be newer than MUTMUT_REV)
for t in tests/plugins/you2025/test_you_mutation_gaps.py tests/plugins/friedrich2023/test_friedrich_mutation_gaps.py; do
  [[ -e "$ROOT/$t" && ! -e "$WORK/$t" ]] && cp "$ROOT/$t" "$WORK/$t"
done
rm -rf "$WORK/.rev"
find "$WORK" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$WORK/tests/mutation"
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
    src/tembench_friedrich2023/ricom_kernels.py
    src/tembench_pelz2022/_kernels.py
    src/tembench_pelz2022/eer_ops.py
pytest_add_cli_args =
    -p
    no:cacheprovider
    -q
pytest_add_cli_args_test_selection =
    -m
    not slow
$selection
mutate_only_covered_lines = false
use_git_change_detection = false
EOF

cd "$WORK"
export PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1
export MPLBACKEND=Agg
PYTHONPATH=src python -c "
import tembench, tembench_you2025, tembench_friedrich2023
for m in (tembench, tembench_you2025, tembench_friedrich2023):
    print('imports', m.__name__, 'from', m.__file__)
    assert m.__file__.startswith('$WORK/src/'), 'the checkout would be tested, not the mutants'
"
start=$(date +%s)
mutmut run --max-children "$JOBS" "${PATTERNS[@]}" > run.log 2>&1 || { tail -c 2000 run.log; }
echo "mutmut run: $(( $(date +%s) - start )) s" > timing.txt
mutmut results --all true > all.txt 2>&1 || true
grep -v ': not checked$' all.txt > results.txt || true
python "$ROOT/tests/mutation/survivors.py" results.txt > survivors.diff || true
python - <<'PY' | tee summary.txt
import collections, re
per = collections.defaultdict(collections.Counter)
for line in open("all.txt"):
    m = re.match(r"\s*(\S+?)\.x[ǁ_]\S*__mutmut_\d+: (\w[\w ]*)$", line)
    if m:
        per[m.group(1)][m.group(2).strip()] += 1
for mod, counts in sorted(per.items()):
    total = sum(counts.values())
    killed = counts.get("killed", 0) + counts.get("timeout", 0) + counts.get("segfault", 0)
    print(f"{mod:40s} {dict(counts)}  killed {killed}/{total}")
PY
cat timing.txt
