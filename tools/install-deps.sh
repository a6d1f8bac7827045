#!/usr/bin/env bash
# Installs, from Debian's packages, whatever lrllm needs that this machine lacks. Idempotent: when
# everything is present it only queries dpkg and returns in well under a second.
set -euo pipefail

packages=(
  build-essential make pkg-config git
  openmpi-bin libopenmpi-dev
  libhdf5-openmpi-dev hdf5-tools
  libboost-program-options-dev
  libopenblas-openmp-dev liblapacke-dev
  libpcre2-dev nlohmann-json3-dev
  libgtest-dev googletest
  python3 python3-torch python3-h5py python3-numpy python3-matplotlib
  nodejs npm
  slurmctld slurmd slurm-client munge  # tests/slurm starts a one-node Slurm
)

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  # npm ships inside nodesource's nodejs package on some images; accept a working npm command instead.
  if [[ "$p" == npm ]] && command -v npm >/dev/null 2>&1; then continue; fi
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
sudo=""
if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
