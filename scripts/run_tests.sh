#!/usr/bin/env bash
# Runs the test suite once per Keras backend (jax, tensorflow, torch) and
# prints a pytest summary for each. Extra arguments are passed to pytest.
# Exits non-zero if any backend fails.
set -u
cd "$(dirname "$0")/.."
status=0
summary=""
for backend in ${BACKENDS:-jax tensorflow torch}; do
  echo "=== KERAS_BACKEND=$backend ==="
  KERAS_BACKEND=$backend python -m pytest -q -p no:cacheprovider "$@" tests
  code=$?
  summary="$summary$backend: exit $code"$'\n'
  if [ $code -ne 0 ]; then status=1; fi
done
echo "=== summary ==="
printf '%s' "$summary"
exit $status
