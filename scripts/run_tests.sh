#!/usr/bin/env bash
# Runs the test suite once per Keras backend and prints a pytest summary for
# each. Exits non-zero if any backend fails.
#
#   bash scripts/run_tests.sh                 # jax, tensorflow and torch
#   BACKENDS=jax bash scripts/run_tests.sh    # one backend
#   PARALLEL=0 bash scripts/run_tests.sh      # one backend after the other
#   bash scripts/run_tests.sh -k gated        # extra arguments go to pytest
#
# The backends run at the same time by default (each suite mostly waits on
# one core: compiling, tracing, small kernels), each into its own log,
# printed when all are done. Tests of whole networks and end-to-end tests
# are shared out over the three backends (see tests/conftest.py): run all
# three for full coverage, or pass --all-backends to run them all on one.
set -u
cd "$(dirname "$0")/.."
backends=${BACKENDS:-jax tensorflow torch}
logs=$(mktemp -d)
status=0
summary=""

run() {
  KERAS_BACKEND=$1 python -m pytest -q -p no:cacheprovider "${@:2}" tests
}

if [ "${PARALLEL:-1}" = "0" ]; then
  for backend in $backends; do
    echo "=== KERAS_BACKEND=$backend ==="
    run "$backend" "$@"
    code=$?
    summary="$summary$backend: exit $code"$'\n'
    if [ $code -ne 0 ]; then status=1; fi
  done
else
  declare -A pids
  for backend in $backends; do
    run "$backend" "$@" >"$logs/$backend.log" 2>&1 &
    pids[$backend]=$!
  done
  for backend in $backends; do
    wait "${pids[$backend]}"
    code=$?
    echo "=== KERAS_BACKEND=$backend ==="
    cat "$logs/$backend.log"
    summary="$summary$backend: exit $code"$'\n'
    if [ $code -ne 0 ]; then status=1; fi
  done
fi
rm -rf "$logs"
echo "=== summary ==="
printf '%s' "$summary"
exit $status
