#!/usr/bin/env bash
# Mutation testing of the You 2025 and Friedrich 2023 plugins' reconstructors and quantifiers
# (issue 18 part 6) with mutmut 3, in a scratch copy outside the checkout; the steps shared with
# run_mutmut_physics.sh (same layout, same variables) are in mutmut_project.sh; results in
# tests/mutation/RESULTS_plugins.md.
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
SELECTION_ARGS=(-m "not slow")
DO_NOT_MUTATE=(src/tembench_friedrich2023/ricom_kernels.py src/tembench_pelz2022/_kernels.py
               src/tembench_pelz2022/eer_ops.py)
# the gap tests of this checkout (they may be newer than MUTMUT_REV)
EXTRA_TESTS=(tests/plugins/you2025/test_you_mutation_gaps.py tests/plugins/friedrich2023/test_friedrich_mutation_gaps.py)

source "$ROOT/tests/mutation/mutmut_project.sh"
mutmut_scratch
mutmut_setup_cfg
export PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1
export MPLBACKEND=Agg
mutmut_check_imports tembench tembench_you2025 tembench_friedrich2023
mutmut_run
