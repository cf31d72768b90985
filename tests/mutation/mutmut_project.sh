# Shared steps of run_mutmut_physics.sh and run_mutmut_plugins.sh (sourced, not run): a scratch mutmut
# project outside the checkout, its setup.cfg, the check that the copies (not the checkout) are imported,
# and the run with its summary. The caller sets, before calling these functions:
#   ROOT (the checkout), WORK (the group's scratch folder), JOBS, ONLY (glob on module paths), PATTERNS
#   (array of mutant-name patterns), modules (array of src/... paths to mutate), tests (array: test paths
#   and --options for pytest's test selection), and optionally DO_NOT_MUTATE (array of src/... paths),
#   SELECTION_ARGS (array of pytest options put before the tests, e.g. (-m "not slow")) and EXTRA_TESTS
#   (array of test files copied from the checkout when MUTMUT_REV's tree lacks them).
# Environment read: MUTMUT_REV (mutate and test that commit, via git archive, instead of the working tree).

# mutmut_scratch: $WORK with src/<every package>, tests/, scenarios/ and pytest.ini; source.txt names the code
mutmut_scratch() {
  case "$WORK" in "$ROOT"|"$ROOT"/*) echo "MUTMUT_WORKDIR must be outside the checkout" >&2; exit 2;; esac
  rm -rf "$WORK"
  mkdir -p "$WORK/src"
  local src=$ROOT
  if [[ -n "${MUTMUT_REV:-}" ]]; then
    src=$WORK/.rev
    mkdir -p "$src"
    git -C "$ROOT" archive "$MUTMUT_REV" platform plugins tests scenarios | tar -x -C "$src"
    echo "commit $(git -C "$ROOT" rev-parse "$MUTMUT_REV")" > "$WORK/source.txt"
  else
    echo "working tree of $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo '?') (uncommitted edits included)" \
      > "$WORK/source.txt"
  fi
  cp -r "$src/platform/tembench" "$WORK/src/tembench"
  local pkg t
  for pkg in "$src"/plugins/tembench_*/; do cp -r "$pkg" "$WORK/src/"; done
  cp -r "$src/tests" "$WORK/tests"
  cp -r "$src/scenarios" "$WORK/scenarios"
  for t in "${EXTRA_TESTS[@]+"${EXTRA_TESTS[@]}"}"; do  # e.g. gap tests newer than MUTMUT_REV
    [[ -e "$ROOT/$t" && ! -e "$WORK/$t" ]] && cp "$ROOT/$t" "$WORK/$t"
  done
  rm -rf "$WORK/.rev"
  find "$WORK" -name __pycache__ -prune -exec rm -rf {} +
  rm -rf "$WORK/tests/mutation"
  # pytest settings (markers, addopts) without the packaging sections
  python "$ROOT/tests/mutation/pytest_ini.py" "$ROOT/pyproject.toml" "$WORK/pytest.ini"
}

# mutmut_setup_cfg: mutmut 3 reads its configuration only from setup.cfg / pyproject.toml
mutmut_setup_cfg() {
  local only="" selection="" skip="" m t
  for m in "${modules[@]}"; do
    if [[ -z "$ONLY" || "$m" == *$ONLY* ]]; then only+="    $m"$'\n'; fi
  done
  for t in "${SELECTION_ARGS[@]+"${SELECTION_ARGS[@]}"}"; do selection+="    $t"$'\n'; done
  for t in "${tests[@]}"; do
    if [[ "$t" == -* || -e "$WORK/$t" ]]; then selection+="    $t"$'\n'; fi
  done
  for m in "${DO_NOT_MUTATE[@]+"${DO_NOT_MUTATE[@]}"}"; do skip+="    $m"$'\n'; done
  cat > "$WORK/setup.cfg" <<EOF
[mutmut]
source_paths = src
also_copy =
    scenarios
only_mutate =
$only
do_not_mutate =
$skip
pytest_add_cli_args =
    -p
    no:cacheprovider
    -q
pytest_add_cli_args_test_selection =
$selection
mutate_only_covered_lines = false
use_git_change_detection = false
EOF
}

# mutmut_check_imports PKG...: the copies under src/ (mutants/src during the run) must shadow the editable install
mutmut_check_imports() {
  (cd "$WORK" && PYTHONPATH=src python - "$WORK" "$@" <<'PY'
import importlib, sys
work, names = sys.argv[1], sys.argv[2:]
for name in names:
    m = importlib.import_module(name)
    print("imports", m.__name__, "from", m.__file__)
    assert m.__file__.startswith(work + "/src/"), "the checkout would be tested, not the mutants"
PY
  )
}

# mutmut_run: the run, every verdict (all.txt; results.txt without 'not checked'), "suspicious" mutants re-run in
# a fresh process, one line per survivor (survivors.diff) and the per-module summary (summary.txt)
mutmut_run() {
  cd "$WORK"
  local start
  start=$(date +%s)
  mutmut run --max-children "$JOBS" "${PATTERNS[@]+"${PATTERNS[@]}"}" > run.log 2>&1 || { tail -c 2000 run.log; }
  echo "mutmut run: $(( $(date +%s) - start )) s" > timing.txt
  mutmut results --all true > all.txt 2>&1 || true
  grep -v ': not checked$' all.txt > results.txt || true

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
  python "$ROOT/tests/mutation/survivors.py" results.txt > survivors.diff || true

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
}
