#!/usr/bin/env bash
# Installs everything the node, its tests and benchmarks need: Debian packages (dcmtk for the
# DICOM peers and encoders, dicom3tools for dciodvfy, postgresql for the PostgreSQL tests,
# openssl for the TLS tests, orthanc as a real PACS in an end-to-end test) and a virtual
# environment in .venv. chromium renders the status page in its browser test.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(dcmtk dicom3tools postgresql openssl orthanc orthanc-dicomweb chromium)
if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
touch .venv/.installed
