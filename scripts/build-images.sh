#!/usr/bin/env bash
# Build diskflow's container images with buildah, from Debian packages and PyPI wheels only
# (no registry is needed or assumed):
#
#   localhost/diskflow-base:bookworm   debootstrap --variant=minbase, imported (reused if present)
#   localhost/diskflow:TAG             controller + importer (images/diskflow/Containerfile)
#   localhost/diskflow-worker:TAG      template-build worker (images/worker/Containerfile)
#   localhost/diskflow-redis:TAG       the Celery broker (images/redis/Containerfile)
#
# Usage: scripts/build-images.sh [--tag TAG] [--rebuild-base] [--no-cache]
#   --tag TAG        tag of the three project images (default: the version in pyproject.toml)
#   --rebuild-base   debootstrap the base again even if localhost/diskflow-base:bookworm exists
#   --no-cache       rebuild every step (buildah --layers caches them; apt lists are refreshed
#                    only when a step runs again, so use this or --rebuild-base for updates)
#
# Runs as root on Debian 12 after `scripts/setup.sh --test` (debootstrap, buildah, podman and
# the project's .venv). Environment overrides: DISKFLOW_DEBIAN_MIRROR,
# DISKFLOW_DEBIAN_SECURITY_MIRROR (default: what the host's apt uses).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

base_image=localhost/diskflow-base:bookworm
tag=""
rebuild_base=0
no_cache=()

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "build-images: error: $*" >&2; exit 1; }
step() { echo "==> [$(date +%H:%M:%S)] $*"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --tag) [[ $# -ge 2 && -n "$2" ]] || die "--tag needs a value"; tag=$2; shift 2 ;;
        --tag=*) tag=${1#--tag=}; [[ -n "$tag" ]] || die "--tag needs a value"; shift ;;
        --rebuild-base) rebuild_base=1; shift ;;
        --no-cache) no_cache=(--no-cache); shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

[[ $EUID -eq 0 ]] || die "must run as root (debootstrap, and buildah's chroot isolation)"
for tool in buildah podman debootstrap; do
    command -v "$tool" >/dev/null || die "$tool is missing: run scripts/setup.sh --test"
done
# The project's venv: its pip (already upgraded: a fresh venv's pip 23 cannot parse some
# current metadata) fetches pip's wheel, and its package versions pin the images'.
python=$repo/.venv/bin/python
[[ -x "$python" ]] || die ".venv is missing: run scripts/setup.sh --test"

version=$("$python" -c 'import tomllib
print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
tag=${tag:-$version}
[[ "$tag" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "not a valid image tag: $tag"

# The same Debian mirror as the host's apt (a CI machine may have a local or snapshot mirror),
# as apt itself parsed it; deb.debian.org when apt knows none.
apt_uri() {
    apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null \
        | awk -v want="$1" '$2 == want { sub("/$", "", $1); print $1; exit }'
}
mirror=${DISKFLOW_DEBIAN_MIRROR:-$(apt_uri bookworm)}
mirror=${mirror:-http://deb.debian.org/debian}
security_mirror=${DISKFLOW_DEBIAN_SECURITY_MIRROR:-$(apt_uri bookworm-security)}
security_mirror=${security_mirror:-http://deb.debian.org/debian-security}

work=$(mktemp -d /var/tmp/diskflow-images.XXXXXX)
rootfs=""
cleanup() {
    # debootstrap and our chroot may leave /proc mounted: never rm -rf through a mount.
    if [[ -n "$rootfs" ]] && mountpoint -q "$rootfs/proc"; then umount -l "$rootfs/proc"; fi
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT

image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }

started=$SECONDS

# ---------------------------------------------------------------- base
build_base() {
    rootfs=$work/rootfs
    # Downloaded .debs are kept, so a --rebuild-base needs only what changed.
    local cache=/var/cache/diskflow-images/debootstrap
    mkdir -p "$cache"
    # An https mirror needs CA certificates in the base for apt to reach it later.
    local include=()
    [[ "$mirror$security_mirror" == *https://* ]] && include=(--include=ca-certificates)
    step "debootstrap bookworm (minbase) from $mirror"
    debootstrap --variant=minbase "${include[@]}" --cache-dir="$cache" \
        bookworm "$rootfs" "$mirror" \
        > "$work/debootstrap.log" 2>&1 \
        || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }

    step "configuring apt in the base and applying updates"
    rm -f "$rootfs/etc/apt/sources.list"
    cat > "$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security_mirror
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # Every image installs only what it names; recommends would pull in compilers and X11.
    cat > "$rootfs/etc/apt/apt.conf.d/90diskflow" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
EOF
    # Documentation is dead weight in an image (copyright files stay, for licences).
    cat > "$rootfs/etc/dpkg/dpkg.cfg.d/90diskflow-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
    # No init system in a container: packages must not try to start their services.
    printf '#!/bin/sh\nexit 101\n' > "$rootfs/usr/sbin/policy-rc.d"
    chmod 755 "$rootfs/usr/sbin/policy-rc.d"

    mountpoint -q "$rootfs/proc" || mount -t proc proc "$rootfs/proc"
    chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        DEBIAN_FRONTEND=noninteractive sh -ec '
            apt-get update -q
            apt-get upgrade -y -q
            apt-get clean
            rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt/* /var/log/dpkg.log
        ' > "$work/upgrade.log" 2>&1 \
        || { tail -n 30 "$work/upgrade.log" >&2; die "apt-get upgrade in the base failed"; }
    umount "$rootfs/proc"
    # The host's resolver config must not end up in the image (buildah provides one at run).
    : > "$rootfs/etc/resolv.conf"

    step "importing $base_image"
    tar -C "$rootfs" --numeric-owner -c . \
        | podman import --change 'CMD ["/bin/bash"]' \
            --message "debootstrap --variant=minbase bookworm $mirror" - "$base_image" >/dev/null
    rm -rf --one-file-system "$rootfs"
    rootfs=""
}

if [[ $rebuild_base -eq 1 ]] || ! image_exists "$base_image"; then
    build_base
else
    step "reusing $base_image (--rebuild-base makes it afresh)"
fi

# ---------------------------------------------------------------- wheels
# Everything Python is built into wheels here, once: the images install them with
# --no-index --only-binary=:all:, so nothing compiles and no resolver runs inside a build.
# The resolution runs under Debian's /usr/bin/python3, the very interpreter the image gets
# (3.11.2): a dependency's markers can differ from the venv's Python (redis needs
# async-timeout below 3.11.3), and sdist-only dependencies (pykickstart) become wheels for
# it. Debian's python3 has no pip: pip runs from its own wheel. Versions are pinned to the
# project's venv, i.e. what the tests ran with. The project source is what git knows of
# (tracked and untracked, not ignored), copied out so the build never writes into the tree.
step "building wheels (diskflow $version and its dependencies, for Debian's python3)"
[[ -x /usr/bin/python3 ]] || die "/usr/bin/python3 (Debian's python3) is missing"
mkdir -p "$work/src" "$work/pip" "$work/context/wheels"
if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$repo" ls-files -z --cached --others --exclude-standard \
        | (cd "$repo" && tar --null --ignore-failed-read -T - -c) | tar -C "$work/src" -x
else
    tar -C "$repo" --exclude=.venv --exclude=__pycache__ -c . | tar -C "$work/src" -x
fi
# Reproducible wheels (zip timestamps from the last commit, and the same file times), so
# buildah's layer cache sees the same COPY when nothing changed and a rerun takes seconds.
if epoch=$(git -C "$repo" log -1 --format=%ct 2>/dev/null) && [[ -n "$epoch" ]]; then
    created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
else
    epoch=$(date +%s)
    created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
fi
export SOURCE_DATE_EPOCH=$epoch
"$python" -m pip freeze --exclude-editable | grep -v '^diskflow[= @]' \
    > "$work/constraints.txt" || true
# (A find-links or extra index in the host's pip config that does not exist makes pip warn
# once per package: those lines are dropped, every other message is kept.)
quiet_pip() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet_pip "$python" -m pip download -q --no-deps --only-binary=:all: -d "$work/pip" pip \
    || die "downloading pip failed"
pip_wheel=$(echo "$work"/pip/pip-*.whl)
quiet_pip /usr/bin/python3 "$pip_wheel/pip" wheel -q --prefer-binary \
    -c "$work/constraints.txt" -w "$work/context/wheels" "$work/src" pip \
    || die "building the wheels failed"
touch -d "@$epoch" "$work/context/wheels" "$work/context/wheels"/*
# The image installs diskflow==VERSION: make sure that is what was built.
ls "$work/context/wheels/diskflow-$version-"*.whl >/dev/null 2>&1 \
    || die "no diskflow-$version wheel was built"

# ---------------------------------------------------------------- images
# org.opencontainers.image.created is the last commit's time, not now: labels that change on
# every run would make every image new and defeat the layer cache of the images built on it.
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)
# org.opencontainers.image.source: DISKFLOW_SOURCE_URL, else the git remote "origin" (the
# project names no public URL of its own); empty when neither exists.
source_url=${DISKFLOW_SOURCE_URL:-$(git -C "$repo" remote get-url origin 2>/dev/null || true)}
bud() {  # bud NAME CONTAINERFILE CONTEXT BASE [buildah args...]
    # The OCI labels every image shares are given here, once; each Containerfile adds only
    # its title and description.
    local name=$1 file=$2 context=$3 base=$4
    shift 4
    step "building $name"
    buildah bud --isolation chroot --layers --force-rm "${no_cache[@]}" --pull=never --quiet \
        --build-arg "BASE_IMAGE=$base_image" \
        --build-arg "VERSION=$version" \
        --label "org.opencontainers.image.version=$version" \
        --label "org.opencontainers.image.revision=$revision" \
        --label "org.opencontainers.image.created=$created" \
        --label "org.opencontainers.image.source=$source_url" \
        --label "org.opencontainers.image.licenses=Apache-2.0" \
        --label "org.opencontainers.image.base.name=$base" \
        "$@" -f "$repo/$file" -t "$name" "$context" >/dev/null \
        || die "building $name failed (buildah output above)"
}

bud "localhost/diskflow:$tag" images/diskflow/Containerfile "$work/context" "$base_image"
bud "localhost/diskflow-worker:$tag" images/worker/Containerfile "$repo/images/worker" \
    "localhost/diskflow:$tag" --build-arg "DISKFLOW_IMAGE=localhost/diskflow:$tag"
bud "localhost/diskflow-redis:$tag" images/redis/Containerfile "$repo/images/redis" "$base_image"

step "done in $((SECONDS - started))s"
buildah images --format '{{.Name}}:{{.Tag}}  {{.Size}}' \
    | grep -E "^localhost/diskflow(-base:bookworm|(-worker|-redis)?:$tag) " || true
