#!/usr/bin/env bash
# Install the services the tests start themselves on 127.0.0.1: Debian's Orthanc with its
# DICOMweb plugin, as the PACS (infra/orthanc.py runs it). gcc builds its loopback shim.
# DCMTK's storescu is the peer bench/push.py measures radrepo's push against.
# Debian's chromium renders the release report headless (tests/test_report.py).
# Idempotent: does nothing when they are already installed. `make test` runs it.
set -euo pipefail
if command -v Orthanc >/dev/null 2>&1 && command -v gcc >/dev/null 2>&1 \
    && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] \
    && command -v chromium >/dev/null 2>&1 && command -v storescu >/dev/null 2>&1; then
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
APT_WAIT=600  # seconds to wait for another apt/dpkg process to let go of its lock
apt_get() {
  # apt-get waits for the dpkg lock itself (DPkg::Lock::Timeout); the package lists' lock that
  # `update` takes is not waited for by every apt version: retry while another apt holds it.
  local deadline=$((SECONDS + APT_WAIT)) out
  while :; do
    if out=$($SUDO apt-get -o DPkg::Lock::Timeout="$APT_WAIT" "$@" 2>&1); then
      return 0
    fi
    if ! grep -qE "Could not get lock|Unable to (lock|acquire)|another process using it" \
        <<<"$out" || ((SECONDS >= deadline)); then
      printf '%s\n' "$out" >&2
      return 1
    fi
    echo "infra/install-services.sh: another apt/dpkg process holds its lock; waiting" >&2
    sleep 5
  done
}
echo "infra/install-services.sh: installing orthanc, orthanc-dicomweb, chromium and dcmtk (apt-get)" >&2
apt_get update -qq
apt_get install -y -qq --no-install-recommends orthanc orthanc-dicomweb gcc libc6-dev chromium dcmtk
if command -v service >/dev/null 2>&1; then
  $SUDO service orthanc stop >/dev/null 2>&1 || true
fi
