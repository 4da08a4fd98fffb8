#!/usr/bin/env bash
# Prepare what bench/gpu.sh needs on the device machine but its image lacks, on a machine WITH
# network access (the device has none): bench/.deps/site.tar.xz (PyAV, pycocotools, pydantic,
# pydantic-settings, the server's FastAPI/uvicorn/redis-py, for CPython 3.12 x86-64) and
# bench/.deps/redis/ (this machine's redis-server with the two libraries a bare image lacks).
# xz because the whole carried tree must stay under 64 MiB: PyAV's wheel alone is 35 MB, the
# compressed site about 27 MB. Then run the device with carry ["bench/.deps"].
set -euo pipefail
cd "$(dirname "$0")/.."
DEPS=bench/.deps
rm -rf "$DEPS" && mkdir -p "$DEPS/wheels" "$DEPS/site" "$DEPS/redis"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEPS/wheels" -r bench/device-requirements.txt
for w in "$DEPS"/wheels/*.whl; do python3 -m zipfile -e "$w" "$DEPS/site/"; done
tar -C "$DEPS/site" -cf - . | xz -9 -T0 > "$DEPS/site.tar.xz"
rm -rf "$DEPS/wheels" "$DEPS/site"
server=$(readlink -f "$(command -v redis-server)")
cp "$server" "$DEPS/redis/redis-server"
for lib in liblzf.so.1 libjemalloc.so.2; do
    cp "$(ldd "$server" | awk -v l="$lib" '$1 == l {print $3}')" "$DEPS/redis/"
done
du -sh "$DEPS"
