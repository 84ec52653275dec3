#!/usr/bin/env bash
# Every GPU of one machine in one process: the mesh spans all local devices (no --multihost). Pick
# the split of the devices with --config.mesh.* (data x fsdp x tensor = the device count).
#
#   bash launch/single_host_gpus.sh configs/dpo.py:paper --config.model.path=/data/smollm2 --config.mesh.fsdp=8
set -euo pipefail
CONFIG="$1"; shift
exec python -m ava_jax.main --config="$CONFIG" "$@"
