#!/usr/bin/env bash
# Install everything and run the whole test suite (lint included). Run as root on Debian 12.
# Then the importer's and the contracts' tests, the controller's pure parts and the demo run
# again on Debian's own Python (/usr/bin/python3,
# 3.11.2 on Debian 12: what container images built from Debian packages have), when the
# Python that made .venv is another one.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --test
bash scripts/services.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .

pytest() {  # pytest VENV ARGS...: pytest's exit 5 (no test ran) is a failure, not a pass
    local venv=$1; shift
    local status=0
    "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" || status=$?
    if [[ $status -eq 5 ]]; then
        echo "pytest collected no tests: failing on purpose" >&2
        return 1
    fi
    return $status
}

if [[ $# -gt 0 ]]; then
    pytest .venv "$@"
else
    # Building the container images is minutes of downloads and dpkg, little CPU: it runs
    # beside the rest of the suite, and its output follows the suite's.
    images_log=$(mktemp)
    pytest .venv -m images --basetemp="$(mktemp -d)" tests/images >"$images_log" 2>&1 &
    images_pid=$!
    status=0
    pytest .venv -m "not images" || status=$?
    images_status=0
    wait "$images_pid" || images_status=$?
    echo "== the container images (tests/images)"
    cat "$images_log"
    rm -f "$images_log"
    if [[ $status -ne 0 || $images_status -ne 0 ]]; then
        exit 1
    fi
fi

debian_python=/usr/bin/python3
if [[ $# -eq 0 && -x $debian_python ]] &&
   [[ "$("$debian_python" -VV)" != "$(.venv/bin/python -VV)" ]]; then
    echo "== the importer's tests, the contracts, the charts and the demo on $("$debian_python" -V) ($debian_python)"
    if [[ ! -x .venv-debian/bin/python ]]; then
        "$debian_python" -m venv .venv-debian
    fi
    .venv-debian/bin/python -m pip install -q --upgrade "pip>=24"
    .venv-debian/bin/python -m pip install -q -e ".[test]"
    pytest .venv-debian tests/importer tests/contracts tests/charts tests/controller/test_plan.py \
        tests/controller/test_decide.py tests/cli/test_import_cli.py
    demo=$(mktemp -d)
    .venv-debian/bin/diskflow demo "$demo" --progress none
    rm -rf "$demo"
fi
