#!/usr/bin/env bash
# Runs one ava_jax job on every worker of a TPU pod slice (one process per host; jax.distributed
# auto-detects the slice, so --multihost needs no addresses). No logic here: see docs/multihost.md.
#
#   TPU=my-v5e-32 ZONE=us-west4-a CONFIG=configs/ava_p.py:paper \
#     EXTRA="--config.model.path=/data/gpt2 --config.workdir=/mnt/shared/runs/ava_p" bash launch/tpu_pod.sh
set -euo pipefail
: "${TPU:?name of the TPU VM}" "${ZONE:?its zone}" "${CONFIG:?e.g. configs/ava_p.py:paper}"
REPO_URL="${REPO_URL:-$(git config --get remote.origin.url)}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d ava_jax ] || git clone $REPO_URL ava_jax
  cd ava_jax && git pull --ff-only
  pip install -q -e . && pip install -q 'jax[tpu]==$JAX_VERSION'
  python -m ava_jax.main --config=$CONFIG --multihost ${EXTRA:-}
"
