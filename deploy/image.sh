#!/usr/bin/env bash
# Builds Bazaar's container image here, with podman: installs podman and
# runc if missing, makes the runtime base (Debian bookworm, minbase, from
# Debian's packages, imported as debian:bookworm-slim: no registry can be
# reached) when it is missing, builds the binary (release; BIN=path takes
# one already built) and the image from deploy/Dockerfile.prebuilt. The
# last line printed is the image's tag.
#
#   TAG=$(deploy/image.sh | tail -n1)
#   podman --runtime runc run --rm --network host "$TAG" up --port 8080
#
# With Docker and registry access, `docker build -t bazaar .` builds the
# same image from the Dockerfile at the root instead.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=debian:bookworm-slim
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
REVISION=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
TAG=${TAG:-localhost/bazaar:$VERSION-$REVISION}

if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
  echo "image: installing podman, runc and debootstrap" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
fi
# crun fails on this kernel's cgroups, and setting RLIMIT_NOFILE is refused.
export CONTAINERS_CONF=${CONTAINERS_CONF:-$HOME/.config/bazaar-containers.conf}
if [[ ! -f $CONTAINERS_CONF ]]; then
  mkdir -p "$(dirname "$CONTAINERS_CONF")"
  printf '[containers]\ndefault_ulimits = []\n' >"$CONTAINERS_CONF"
fi
podman() { command podman --runtime runc "$@"; }

if ! podman image exists "$BASE"; then
  echo "image: making $BASE from Debian packages (debootstrap minbase)" >&2
  root=$(mktemp -d)
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
  # What a runtime never reads: package lists and caches, docs, locales.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/usr/share/info/*
  tar -C "$root" -c . | podman import --change 'CMD ["bash"]' - "$BASE" >/dev/null
  rm -rf "$root"
fi

if [[ -z ${BIN:-} ]]; then
  cargo build --release --locked -q -p bazaar
  BIN=${CARGO_TARGET_DIR:-target}/release/bazaar
fi
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
# Debug info off (symbols stay, for backtraces): ~108 MB -> ~24 MB.
if command -v strip >/dev/null; then strip --strip-debug -o "$context/bazaar" "$BIN"; else cp "$BIN" "$context/bazaar"; fi
podman build --pull=never --format docker -q \
  --build-arg VERSION="$VERSION" --build-arg REVISION="$REVISION" \
  -f deploy/Dockerfile.prebuilt -t "$TAG" "$context" >/dev/null
echo "$TAG"
