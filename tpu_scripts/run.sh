#!/usr/bin/env bash
# Runs `jaxft train` on every worker, and keeps it running across preemptions: when the slice is
# preempted (spot capacity) or a worker dies, it waits for the TPU to be READY again, reinstalls,
# and starts the same command; jaxft resumes from the newest checkpoint in the workdir by itself.
#   BUCKET=my-bucket ./install.sh
#   ./run.sh --config configs/llama3_8b_lora.py:v5e-8 --config.workdir=/mnt/gcs/runs/llama8b
# The workdir must outlive the VM: /mnt/gcs is the bucket mounted by install.sh (spot VMs lose their disks).
set -euo pipefail
cd "$(dirname "$0")" && source common.sh
[[ "${1:-}" == "--help" || $# -eq 0 ]] && { sed -n 2,7p "$0"; exit 0; }
need_gcloud
args=$(printf '%q ' "$@")
: "${MAX_RESTARTS:=20}"
: "${POLL_SECONDS:=60}"   # between checks of the slice's state after a stop
for attempt in $(seq 1 "$MAX_RESTARTS"); do
  echo "== attempt $attempt: jaxft train $args"
  # On a pod, jax.distributed.initialize() finds its peers from the TPU metadata; nothing to set.
  if on_all_workers "cd ${REMOTE_DIR} && jaxft train $args"; then
    echo "== finished"; exit 0
  fi
  echo "== the run stopped (preemption or failure); waiting for $TPU_NAME to be READY"
  until [[ "$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} \
              --format='value(state)' 2>/dev/null)" == "READY" ]]; do
    sleep "$POLL_SECONDS"
    [[ -n "${RECREATE:-}" ]] && ./create.sh || true   # spot slices are deleted on preemption: RECREATE=1 recreates
  done
  ./install.sh
done
die "gave up after $MAX_RESTARTS attempts"
