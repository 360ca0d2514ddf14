#!/usr/bin/env bash
# Set up the GPU machine for a run: the carried wheels (diffusers, ftfy, ...), the ffmpeg binary,
# and optionally turbodiffusion built from its sdist. Source it: `source bench/gpu_setup.sh [--turbo]`.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
cp -r .whl/pylib/* /tmp/site/
# bytecode once: without it every job process recompiles diffusers (seconds per job)
python3 -m compileall -q -j 0 /tmp/site > /dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
if [ ! -x /tmp/ffmpeg ]; then xz -dc .whl/ffmpeg.xz > /tmp/ffmpeg && chmod +x /tmp/ffmpeg; fi
export IMAGEIO_FFMPEG_EXE=/tmp/ffmpeg
if [ "${1:-}" = "--turbo" ]; then
  python3 -m pip install -q --no-build-isolation --no-deps --no-index --target /tmp/site .whl/turbodiffusion-*.tar.gz
fi
