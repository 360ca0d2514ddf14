#!/usr/bin/env bash
# The benchmark runs recorded in BENCHMARKS.md, on a two-GPU machine (one device-tool call each).
#   bash bench/gpu_session.sh 480p   8 rows at 480p: the pipeline with --resources gpu=1 pinned to
#                                    card 0 while the reference loop runs on card 1, then the same
#                                    sheet with --resources gpu=2 (both cards)
#   bash bench/gpu_session.sh 720p   8 rows at 720p: pipeline gpu=1 on card 0, reference on card 1
# Results go to $OUT (the device tool's folder) or /tmp/bench-out. Setup is skipped when a warm
# machine already has it.
set -u
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
W=/tmp/b
export PYTHONUNBUFFERED=1
unset PYTHONDONTWRITEBYTECODE  # job processes keep compiled bytecode, as on a normal install
source bench/gpu_setup.sh > "$OUT/setup.log" 2>&1 || { tail -30 "$OUT/setup.log"; exit 1; }
nvidia-smi -L
if ! python3 -c "import turbodiffusion" 2>/dev/null; then
  python3 -m pip install -q --no-build-isolation --no-deps --no-index --target /tmp/site \
    .whl/turbodiffusion-*.tar.gz > "$OUT/turbo.log" 2>&1 &
  BUILD=$!
fi
python3 bench/bench_pipeline.py models --workdir $W 2>&1 | tail -2
[ -n "${BUILD:-}" ] && wait "$BUILD"
python3 -c "import turbodiffusion; print('turbodiffusion', turbodiffusion.__file__)" || tail -20 "$OUT/turbo.log"

bench() { python3 bench/bench_pipeline.py "$@" --workdir $W; }
case "${1:-480p}" in
  480p)
    CUDA_VISIBLE_DEVICES=0 bench pipeline --resolution 480p --rows 8 --gpus 1 --tag p480g1 > "$OUT/p480g1.txt" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 bench reference --resolution 480p --rows 8 --tag r480 > "$OUT/r480.txt" 2>&1
    wait
    bench pipeline --resolution 480p --rows 8 --gpus 2 --tag p480g2 > "$OUT/p480g2.txt" 2>&1
    ;;
  720p)
    CUDA_VISIBLE_DEVICES=0 bench pipeline --resolution 720p --rows "${2:-8}" --gpus 1 --tag p720g1 > "$OUT/p720g1.txt" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 bench reference --resolution 720p --rows "${2:-8}" --tag r720 > "$OUT/r720.txt" 2>&1
    wait
    ;;
esac
tail -n +1 "$OUT"/p*.txt "$OUT"/r*.txt
(cd $W && tar czf "$OUT/logs-$1.tgz" --exclude='*.png' --exclude='*.mp4' --exclude='*.safetensors' \
   --exclude='.store' --exclude=images */pipeline/results/logs */pipeline/results/benchmarks */pipeline/snakemake.log) || true
