#!/usr/bin/env bash
# Install what diskflow needs on Debian 12 (as root): system tools and a virtualenv in .venv.
#   scripts/setup.sh          the CLI and its runtime tools
#   scripts/setup.sh --test   also what the test suite and benchmarks use
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(python3 python3-venv qemu-utils util-linux mount)
extras=""
if [[ "${1:-}" == "--test" ]]; then
    # Real servers and tools the tests drive: nginx (Range/ETag), compressors, openssl (TLS).
    packages+=(nginx-light curl gzip xz-utils zstd bzip2 openssl)
    extras="[test]"
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${packages[@]}"

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
# A fresh venv's pip (23.x) cannot parse some current packages' metadata.
.venv/bin/python -m pip install -q --upgrade "pip>=24"
.venv/bin/python -m pip install -q -e ".${extras}"
