#!/usr/bin/env bash
# Install the local services the tests start (on 127.0.0.1 only): Orthanc with DICOMweb, as the PACS.
# Idempotent: does nothing when they are already installed.
set -euo pipefail
if command -v Orthanc >/dev/null 2>&1 && ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  SUDO=sudo
else
  SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb >/dev/null
# The package starts a system Orthanc on 0.0.0.0:8042/4242; tests run their own on loopback.
if command -v service >/dev/null 2>&1; then
  $SUDO service orthanc stop >/dev/null 2>&1 || true
fi
