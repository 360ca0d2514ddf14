#!/usr/bin/env bash
# Build .whl/, what bench/gpu_setup.sh installs on the GPU machine (which has torch, transformers,
# safetensors, pandas, but no diffusers, snakemake or turbodiffusion, and no network). Run here,
# after `make venv`: the versions are the ones the venv resolved. The device tool carries .whl
# (64 MiB at most, so the big pieces are xz-compressed):
#   .whl/kit.tar.xz        every missing wheel for CPython 3.12 on x86-64, re-zipped uncompressed
#                          so that xz compresses across them (pulp's solver binaries, mostly)
#   .whl/ffmpeg.xz         an ffmpeg binary: imageio-ffmpeg 0.6.0's (ffmpeg 7.0.2, 80 MB); 0.8.1's
#                          (ffmpeg 9.0.2, 173 MB) would not fit
#   .whl/pylib/            imageio_ffmpeg's Python code (IMAGEIO_FFMPEG_EXE points at the binary)
#   .whl/turbodiffusion-1.0.0.tar.gz   the sdist, built there (it compiles CUDA)
# The "already there" list is the device tool's KINDS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$PWD/.venv/bin/python
KINDS=../.library/device/KINDS.md
rm -rf .whl /tmp/kit && mkdir -p .whl/pylib /tmp/kit/wheels /tmp/kit/stored
sed -n '/^## Python packages already there/,$p' "$KINDS" | tail -1 | sed 's/.*Packages: //; s/\.$//' > /tmp/kit/there
# What diffusers, snakemake and the rest need that the GPU machine lacks, as this venv resolved it.
$PY - diffusers ftfy jsonschema imageio-ffmpeg snakemake > /tmp/kit/need <<'EOF'
import re, sys
from importlib.metadata import distribution
from packaging.requirements import Requirement
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
there = {norm(n) for n in open("/tmp/kit/there").read().replace(",", " ").split()}
seen, todo = {}, sys.argv[1:]
while todo:
    name = norm(todo.pop())
    if name in seen:
        continue
    dist = distribution(name)
    seen[name] = dist.version
    for line in dist.requires or []:
        req = Requirement(line)
        if not req.marker or req.marker.evaluate({"extra": ""}):
            todo.append(req.name)
print("\n".join(f"{n}=={v}" for n, v in sorted(seen.items()) if n not in there))
EOF
PLATFORMS="--python-version 3.12 --implementation cp"
for tag in 1 2014 _2_17 _2_24 _2_27 _2_28 _2_31 _2_34 _2_35; do PLATFORMS+=" --platform manylinux${tag}_x86_64"; done
while read -r req; do
  # a wheel for the GPU machine, or (pure-Python packages published only as sdists) one built here
  $PY -m pip download -q --no-deps --only-binary=:all: $PLATFORMS -d /tmp/kit/wheels "$req" 2>/dev/null ||
    $PY -m pip wheel -q --no-deps -w /tmp/kit/wheels "$req" 2>/dev/null
done < /tmp/kit/need
rm /tmp/kit/wheels/imageio_ffmpeg-*.whl
$PY -m pip download -q --no-deps --only-binary=:all: $PLATFORMS -d /tmp/kit/ff imageio-ffmpeg==0.6.0
(cd /tmp/kit/ff && $PY -m zipfile -e imageio_ffmpeg-*.whl .)
xz -9 -T0 -c /tmp/kit/ff/imageio_ffmpeg/binaries/ffmpeg-* > .whl/ffmpeg.xz
# imageio_ffmpeg's Python code as the venv has it, without its binary
cp -r "$($PY -c 'import imageio_ffmpeg, os; print(os.path.dirname(imageio_ffmpeg.__file__))')" .whl/pylib/
rm -rf .whl/pylib/imageio_ffmpeg/binaries/ffmpeg-* .whl/pylib/imageio_ffmpeg/__pycache__
for whl in /tmp/kit/wheels/*.whl; do
  (rm -rf /tmp/kit/x && mkdir /tmp/kit/x && cd /tmp/kit/x && $PY -m zipfile -e "$whl" . &&
   rm -rf pulp/solverdir/cbc/{win,osx,linux/i32,linux/arm64} &&  # pulp: only the x86-64 Linux solver
   zip -q -0 -r -X "/tmp/kit/stored/$(basename "$whl")" .)
done
tar -C /tmp/kit/stored -cf - . | xz -9 -T0 > .whl/kit.tar.xz
curl -sfL -o .whl/turbodiffusion-1.0.0.tar.gz \
  https://files.pythonhosted.org/packages/51/59/ee6375f46befedbedf481a0ed8ec6cf6c0f53d03313d078452ac59f6c81b/turbodiffusion-1.0.0.tar.gz
du -sh .whl/* && du -sh .whl
