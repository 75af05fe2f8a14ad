#!/usr/bin/env bash
# Train the runs behind docs/RESULTS.md and rewrite it: the papers' claims measured with 95%
# confidence intervals over 3 seeds (261 runs, about 90 minutes on 2 CPU cores). Finished runs in
# runs/reproduce are kept, so a stopped reproduction continues where it stopped; extra options
# go to `sparsetrain reproduce` (--jobs N, --runs-dir DIR, --results FILE, --no-train).
# The CIFAR-10 runs read cifar10_sample.npz from $SPARSETRAIN_CIFAR10_SAMPLE, else from
# ../shared/data beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/sparsetrain ] || bash scripts/setup.sh
SAMPLE="${SPARSETRAIN_CIFAR10_SAMPLE:-../shared/data/cifar10_sample.npz}"
if [ ! -f "$SAMPLE" ]; then
    echo "reproduce: cifar10_sample.npz not found at $SAMPLE; set SPARSETRAIN_CIFAR10_SAMPLE" \
         "to its path" >&2
    exit 2
fi
exec .venv/bin/sparsetrain reproduce --cifar10-sample "$SAMPLE" "$@"
