#!/usr/bin/env bash
# Installs jaxft with TPU jax on every worker; with BUCKET set, mounts gs://BUCKET at /mnt/gcs (gcsfuse)
# so that a workdir there survives preemption.   BUCKET=my-bucket JAXFT_SOURCE=git+https://github.com/ORG/jaxft ./install.sh
set -euo pipefail
cd "$(dirname "$0")" && source common.sh
[[ "${1:-}" == "--help" ]] && { sed -n 2,3p "$0"; exit 0; }
need_gcloud
mount=""
if [[ -n "${BUCKET:-}" ]]; then
  mount="&& (mountpoint -q /mnt/gcs || (sudo apt-get -qq install -y gcsfuse >/dev/null 2>&1 || true; \
    sudo mkdir -p /mnt/gcs && sudo gcsfuse --implicit-dirs -o allow_other ${BUCKET} /mnt/gcs))"
fi
on_all_workers "python3 -m pip install -q --upgrade pip && python3 -m pip install -q '${JAXFT_SOURCE}[tpu]' && mkdir -p ${REMOTE_DIR} ${mount}"
