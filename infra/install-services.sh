#!/usr/bin/env bash
# Install the services the tests start themselves on 127.0.0.1: Debian's Orthanc with its
# DICOMweb plugin, as the PACS (infra/orthanc.py runs it). gcc builds its loopback shim.
# DCMTK's storescu is the peer bench/push.py measures radrepo's push against.
# Idempotent: does nothing when they are already installed. `make test` runs it.
set -euo pipefail
if command -v Orthanc >/dev/null 2>&1 && command -v gcc >/dev/null 2>&1 \
    && command -v storescu >/dev/null 2>&1 \
    && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
  exit 0
fi
SUDO=
if [ "$(id -u)" != 0 ]; then
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
# The package would start a system Orthanc on 0.0.0.0:8042/4242: forbid service starts while
# installing (the usual policy-rc.d of containers), unless a policy is already in place.
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod +x "$POLICY"
  trap '$SUDO rm -f "$POLICY"' EXIT
fi
echo "infra/install-services.sh: installing orthanc, orthanc-dicomweb and dcmtk (apt-get)" >&2
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb gcc libc6-dev dcmtk >/dev/null
if command -v service >/dev/null 2>&1; then
  $SUDO service orthanc stop >/dev/null 2>&1 || true
fi
