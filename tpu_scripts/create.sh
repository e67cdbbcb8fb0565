#!/usr/bin/env bash
# Creates a TPU VM (or pod slice). SPOT=1 asks for preemptible capacity (cheaper; run.sh resumes).
#   ACCELERATOR=v4-32 SPOT=1 ./create.sh
set -euo pipefail
cd "$(dirname "$0")" && source common.sh
[[ "${1:-}" == "--help" ]] && { sed -n 2,3p "$0"; exit 0; }
need_gcloud
gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} \
  --accelerator-type "$ACCELERATOR" --version "$RUNTIME" ${SPOT:+--spot}
