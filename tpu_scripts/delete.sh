#!/usr/bin/env bash
# Deletes the TPU VM / slice (checkpoints on gs:// stay).
set -euo pipefail
cd "$(dirname "$0")" && source common.sh
[[ "${1:-}" == "--help" ]] && { sed -n 2,2p "$0"; exit 0; }
need_gcloud
gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --quiet
