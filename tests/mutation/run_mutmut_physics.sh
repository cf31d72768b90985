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
# The scratch copy, setup.cfg, import check, run and summary are shared with run_mutmut_plugins.sh
# (mutmut_project.sh).
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
DO_NOT_MUTATE=(src/tembench_pelz2022/_kernels.py src/tembench_pelz2022/eer_ops.py)

# MUTMUT_REV=<commit>: mutate and test that commit (git archive) instead of the working tree, e.g.
# while someone else edits a file; the commit is recorded in $WORK/source.txt
source "$ROOT/tests/mutation/mutmut_project.sh"
mutmut_scratch
mutmut_setup_cfg
export PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1
mutmut_check_imports tembench tembench_pelz2022 tembench_ren2020
mutmut_run
