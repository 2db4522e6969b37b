#!/usr/bin/env bash
# Start a one-machine Ray head, run a recipe against it as a cluster job would, then stop Ray.
#   cluster/local.sh r1-zero rl.steps=20
set -euo pipefail
recipe="${1:?usage: cluster/local.sh RECIPE [key=value ...]}"
shift
num_cpus="${NUM_CPUS:-$(nproc)}"
ray start --head --num-cpus="$num_cpus" --include-dashboard=false --disable-usage-stats
trap 'ray stop --force' EXIT
r1pipe run "$recipe" cluster.address=auto "$@"
