#!/usr/bin/env bash
# Set up the GPU machine for a run: the carried wheels (diffusers, ftfy, ...), Snakemake with its
# dependencies, the ffmpeg binary, and optionally turbodiffusion built from its sdist.
# Source it: `source bench/gpu_setup.sh [--turbo]`.
# The wheels travel as .whl/kit.tar.xz (bench/make_device_kit.sh builds it): stored uncompressed in
# one xz tarball, a third smaller than the wheels as PyPI ships them. One pip call installs them all
# (a second `--target --upgrade` call would replace /tmp/site/bin).
rm -rf /tmp/kit-wheels && mkdir -p /tmp/kit-wheels || return 1
xz -dc .whl/kit.tar.xz | tar -xf - -C /tmp/kit-wheels || return 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/kit-wheels/*.whl || return 1
cp -r .whl/pylib/* /tmp/site/
# bytecode once: without it every job process recompiles diffusers (seconds per job)
python3 -m compileall -q -j 0 /tmp/site > /dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
# the `snakemake` console script (pip --target puts it in /tmp/site/bin)
case ":$PATH:" in *:/tmp/site/bin:*) ;; *) export PATH=/tmp/site/bin:$PATH ;; esac
if [ ! -x /tmp/ffmpeg ]; then xz -dc .whl/ffmpeg.xz > /tmp/ffmpeg && chmod +x /tmp/ffmpeg; fi
export IMAGEIO_FFMPEG_EXE=/tmp/ffmpeg
if [ "${1:-}" = "--turbo" ]; then
  python3 -m pip install -q --no-build-isolation --no-deps --no-index --target /tmp/site .whl/turbodiffusion-*.tar.gz
fi
