# Shared settings of the TPU scripts; override any of them in the environment.
#   TPU_NAME=my-v5e ZONE=us-west4-a ACCELERATOR=v5litepod-8 ./create.sh
: "${TPU_NAME:=jaxft-tpu}"
: "${ZONE:=us-west4-a}"
: "${ACCELERATOR:=v5litepod-8}"          # v5litepod-8 (v5e-8), v4-8, v5p-8, v6e-8, or a pod slice such as v4-32
: "${RUNTIME:=v2-alpha-tpuv5-lite}"      # TPU VM image matching the accelerator (v4: tpu-ubuntu2204-base)
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${JAXFT_SOURCE:=jaxft}"               # what pip installs on the workers: "jaxft", a git URL, or a wheel path
: "${REMOTE_DIR:=jaxft-run}"             # working folder on every worker

die() { echo "error: $*" >&2; exit 1; }
need_gcloud() { command -v gcloud >/dev/null || die "gcloud is not installed (https://cloud.google.com/sdk)"; }

# Runs a command on every worker of the slice (a pod has several hosts; all must run the same program).
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all --command "$1"
}
