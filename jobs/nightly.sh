#!/usr/bin/env bash
# Nightly regression: render jobs/nightly.yaml once per sampler, compare each with its blessed
# baseline, write HTML reports. Exit 0 only when every sampler's compare passes.
#   jobs/nightly.sh                 # compare against $BASELINES (default baselines/nightly)
#   jobs/nightly.sh --bless         # render and make these outputs the new baselines
# Environment: OUT (default out/nightly), BASELINES (local folder or s3:// prefix),
# SAMPLERS (default "ddim euler_a dpmpp_2m"), COMPARE_ARGS (e.g. "--max-pixel-diff 1"),
# BATCHGEN (default: .venv/bin/batchgen of this checkout, else batchgen on PATH).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/nightly}
BASELINES=${BASELINES:-baselines/nightly}
SAMPLERS=${SAMPLERS:-ddim euler_a dpmpp_2m}
# The batchgen command: $BATCHGEN, else this checkout's .venv (made by `make install`), else PATH.
if [[ -z "${BATCHGEN:-}" ]]; then
  if [[ -x .venv/bin/batchgen ]]; then
    BATCHGEN=.venv/bin/batchgen
  elif command -v batchgen >/dev/null 2>&1; then
    BATCHGEN=batchgen
  else
    echo "nightly.sh: no batchgen found: run \`make install\` (creates .venv), activate the virtualenv that has" \
         "batchgen, or set BATCHGEN=/path/to/batchgen" >&2
    exit 2
  fi
fi
status=0
for s in $SAMPLERS; do
  if [[ "${1:-}" == "--bless" ]]; then
    $BATCHGEN run jobs/nightly.yaml --overwrite --set sampling.sampler="$s" --set output.uri="$BASELINES/$s" \
      || status=1
    continue
  fi
  $BATCHGEN run jobs/nightly.yaml --overwrite --set sampling.sampler="$s" --set output.uri="$OUT/$s" || status=1
  # shellcheck disable=SC2086
  $BATCHGEN compare "$BASELINES/$s" "$OUT/$s" --report "$OUT/report-$s" ${COMPARE_ARGS:-} || status=1
done
exit $status
