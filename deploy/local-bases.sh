#!/usr/bin/env bash
# Build the base images the Dockerfiles and docker-compose.yml need, from Debian packages alone, for a
# machine that reaches no image registry (only a Debian mirror and PyPI):
#
#   localhost/stemseg-base/debian:bookworm       debootstrap --variant=minbase, imported with `podman import`
#   localhost/stemseg-base/python:3.11-bookworm  + Debian's python3 (3.11) and python3-venv; stands in for
#                                                python:3.11-slim-bookworm (BASE_IMAGE of docker/api.Dockerfile)
#   localhost/stemseg-base/redis:7-bookworm      + Debian's redis-server (7.0); stands in for redis:7-alpine
#                                                (STEMSEG_REDIS_IMAGE in docker-compose.yml)
#
# An image that exists already is kept (delete it with `podman rmi` to rebuild), so a second run takes
# seconds. Needs root (debootstrap, podman) and `apt-get install podman runc debootstrap`.
# Usage: deploy/local-bases.sh [--mirror URL]
set -euo pipefail

MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
[[ ${1:-} == --mirror ]] && MIRROR=$2
HERE=$(cd "$(dirname "$0")" && pwd)
DEBIAN=localhost/stemseg-base/debian:bookworm
PYTHON=localhost/stemseg-base/python:3.11-bookworm
REDIS=localhost/stemseg-base/redis:7-bookworm

have() { podman image exists "$1"; }

if ! have "$DEBIAN"; then
  rootfs=$(mktemp -d /tmp/stemseg-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  echo "debootstrap bookworm from $MIRROR (a few minutes, once)"
  debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$MIRROR" >/dev/null
  # What an image does not need: package lists and caches, docs, man pages (as the official slim images).
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log
  tar --numeric-owner -C "$rootfs" -c . | podman import --quiet \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' - "$DEBIAN" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
fi

have "$PYTHON" || podman build --quiet --build-arg "DEBIAN_IMAGE=$DEBIAN" -t "$PYTHON" \
    -f "$HERE/local-bases/python.Containerfile" "$HERE/local-bases" >/dev/null
have "$REDIS" || podman build --quiet --build-arg "DEBIAN_IMAGE=$DEBIAN" -t "$REDIS" \
    -f "$HERE/local-bases/redis.Containerfile" "$HERE/local-bases" >/dev/null

podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^localhost/stemseg-base/' | sort
