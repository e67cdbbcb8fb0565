#!/usr/bin/env bash
# The wheelhouse of what the accelerator's image lacks, for its Python 3.12 on x86-64 manylinux.
#
#     bash benchmarks/wheels.sh            # here, where pip reaches the registry: builds .whl/
#     bash benchmarks/wheels.sh --check    # only checks .whl/ (what the device call runs; no network there)
#
# The device image (see the device notes' KINDS.md) has jax 0.11.2, flax, optax, orbax,
# transformers, peft, torch and pytest, but not these, which the suite's code paths import:
#   grain (jaxft.data, imported by the DPO objective train_throughput.py loads) and its
#   array_record + portpicker; ml_collections (jaxft.config); tensorboardX (the train loop's writer).
# tensorflow-datasets and datasets are imported only by the data sources that read them, which no
# benchmark uses, so they stay out. Each wheel comes with --no-deps: everything they need
# (absl-py, etils, cloudpickle, protobuf, psutil, pyyaml, numpy, packaging) is in the image.
# jaxft itself is built as a wheel too (the suite still puts the repo first on PYTHONPATH).
# When .whl/ already holds exactly these pins (its .packages stamp), nothing is downloaded: that is
# how the same command line runs on the device. Fails when the working tree that travels with a
# call (tracked + untracked-not-ignored files + .whl/) exceeds 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELHOUSE=.whl
LIMIT=$((64 * 1024 * 1024))
PACKAGES=(grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0 tensorboardX==2.6.5)
PLATFORMS=()
for n in 17 24 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)

stamp="$(printf '%s\n' "${PACKAGES[@]}")"
if [[ "${1:-}" != "--check" ]] && ! { [[ -f $WHEELHOUSE/.packages ]] && [[ "$(cat $WHEELHOUSE/.packages)" == "$stamp" ]]; }; then
  rm -rf "$WHEELHOUSE" && mkdir -p "$WHEELHOUSE"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$WHEELHOUSE" "${PACKAGES[@]}"
  python3 -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELHOUSE" . >/dev/null
  rm -rf build jaxft.egg-info
  printf '%s\n' "$stamp" > "$WHEELHOUSE/.packages"
  grep -qx '/.whl/' .gitignore 2>/dev/null || echo "note: add /.whl/ to .gitignore so the wheelhouse is carried, not committed" >&2
fi
for pin in "${PACKAGES[@]}"; do
  name="${pin%%==*}"; version="${pin##*==}"
  [[ -n "$(find "$WHEELHOUSE" -maxdepth 1 -iname "${name//-/_}-${version}-*.whl")" ]] \
    || { echo "wheels.sh: $pin missing from $WHEELHOUSE/: run bash benchmarks/wheels.sh where pip reaches the registry" >&2; exit 1; }
done
ls "$WHEELHOUSE"/jaxft-*.whl >/dev/null 2>&1 || { echo "wheels.sh: no jaxft wheel in $WHEELHOUSE/" >&2; exit 1; }
wheels=$(du -cb "$WHEELHOUSE" | tail -1 | cut -f1)
tree=0
if git rev-parse --git-dir >/dev/null 2>&1; then
  tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r du -cb 2>/dev/null | awk '$2 == "total" {s += $1} END {print s + 0}')
fi
total=$((wheels + tree))
awk -v n="$(ls "$WHEELHOUSE"/*.whl | wc -l)" -v w="$wheels" -v t="$total" -v l="$LIMIT" 'BEGIN {
  printf "wheels.sh: %d wheels, %.1f MiB; with the working tree %.1f MiB of the %d MiB a call carries\n", n, w / 1048576, t / 1048576, l / 1048576 }'
if (( total > LIMIT )); then
  echo "wheels.sh: over the ${LIMIT}-byte limit: carry fewer wheels or ignore large untracked files" >&2
  exit 1
fi
