#!/usr/bin/env bash
# The benchmark runs recorded in BENCHMARKS.md, one device-tool call each (two GPUs unless it says).
#   bash bench/gpu_session.sh cards      8 rows at 480p through the pipeline with --cores 1
#                                        --resources gpu=1, then with --cores 4 --resources gpu=2 (both
#                                        cards, a worker each), then the GPU tests
#   bash bench/gpu_session.sh 480p [N]   N (8) rows at 480p: the pipeline (--cores 1 --resources gpu=1) on
#                                        card 0 while the reference loop runs on card 1
#   bash bench/gpu_session.sh 720p [N]   the same at 720p
#   bash bench/gpu_session.sh final      720p, 8 rows, wave_rows 8: the pipeline on card 0 while the
#                                        reference runs on card 1, then the load probe on card 1
#   bash bench/gpu_session.sh warm       on one GPU: set up, write the models, compile an expert once
#                                        (Inductor's cache), so that the next two calls run warm
#   bash bench/gpu_session.sh cold       on one GPU (no turbodiffusion build): an expert's load from
#                                        disk (its file's pages dropped from the page cache), then warm
#   bash bench/gpu_session.sh rss        on one GPU: an expert job's host memory (load, compile, two
#                                        forwards), with a cold and then a warm Inductor cache
#   bash bench/gpu_session.sh one        on one GPU: the 720p 8-row pipeline (wave_rows 8), no reference
#   bash bench/gpu_session.sh own        the same with worker: false (every model job loads its own models)
#   bash bench/gpu_session.sh ref        on one GPU: the reference loop alone
#   bash bench/gpu_session.sh reference  on one GPU: the reference loop on the same rows, then the
#                                        probes of RSS baseline, warm load and import hiding
#   bash bench/gpu_session.sh final4     on four GPUs at once: card 0 the 720p 8-row pipeline (wave_rows
#                                        8), card 1 the reference, card 2 int8 experts on 2 rows (unsliced),
#                                        card 3 bf16 on the same 2 rows, then a compile in a fresh process
#   bash bench/gpu_session.sh int8 [N]   720p, N (2) rows on one card: int8 experts (activation_slices
#                                        8), then bf16, then the int8 probe under a 22 GB cap
#   bash bench/gpu_session.sh tests      the GPU tests, then the import and exit probes
#   bash bench/gpu_session.sh check      on one GPU: set up, build turbodiffusion, write the models, GPU tests
#   bash bench/gpu_session.sh pr [N]     on one GPU: N (4) rows at 720p through the pipeline, then the
#                                        reference loop on the same rows (its latents compared)
#   bash bench/gpu_session.sh last       tests/test_gpu.py, then the bf16 expert probe (eager, compiled)
#   bash bench/gpu_session.sh probe      bench/probe_gpu.py at 720p (imports, norms, compile, int8
#                                        under a 22 GB cap, VAE), then the GPU tests
# Results go to $OUT (the device tool's folder) or /tmp/bench-out. Setup is skipped when a warm
# machine already has it.
set -u
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
W=/tmp/b
export PYTHONUNBUFFERED=1
unset PYTHONDONTWRITEBYTECODE  # job processes keep compiled bytecode, as on a normal install
date; source bench/gpu_setup.sh > "$OUT/setup.log" 2>&1 || { tail -30 "$OUT/setup.log"; exit 1; }
nvidia-smi -L
if [ "${1:-}" != cold ] && ! python3 -c "import turbodiffusion" 2>/dev/null; then
  python3 -m pip install -q --no-build-isolation --no-deps --no-index --target /tmp/site \
    .whl/turbodiffusion-*.tar.gz > "$OUT/turbo.log" 2>&1 &
  BUILD=$!
fi
INT8=; case "${1:-}" in probe|final4|int8) INT8=--int8 ;; esac
date; python3 bench/bench_pipeline.py models --workdir $W $INT8 2>&1 | tail -3
[ -n "${BUILD:-}" ] && wait "$BUILD"; date
python3 -c "import turbodiffusion; print('turbodiffusion', turbodiffusion.__file__)" || tail -20 "$OUT/turbo.log"

bench() { python3 bench/bench_pipeline.py "$@" --workdir $W; }
T0=$(date +%s); stamp() { echo "[$(( $(date +%s) - T0 )) s after setup] $*"; }
case "${1:-cards}" in
  cards)
    stamp "gpu=1"; bench pipeline --resolution 480p --rows 8 --gpus 1 --tag c480g1 > "$OUT/c480g1.txt" 2>&1
    stamp "gpu=2"; bench pipeline --resolution 480p --rows 8 --cores 4 --gpus 2 --tag c480g2 > "$OUT/c480g2.txt" 2>&1
    stamp "gpu tests"; timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py > "$OUT/gpu-tests.txt" 2>&1
    ;;
  probe)
    stamp "probe"; timeout 330 python3 bench/probe_gpu.py --models $W/models --resolution 720p > "$OUT/probe.txt" 2>&1
    stamp "gpu tests"; timeout 100 python3 -m pytest -m gpu -q -x -p no:cacheprovider tests/test_gpu.py > "$OUT/gpu-tests.txt" 2>&1
    ;;
  final)
    CUDA_VISIBLE_DEVICES=0 bench pipeline --resolution 720p --rows 8 --wave-rows 8 --gpus 1 --tag p720b8 > "$OUT/p720b8.txt" 2>&1 &
    (CUDA_VISIBLE_DEVICES=1 bench reference --resolution 720p --rows 8 --tag r720 > "$OUT/r720.txt" 2>&1
     stamp "load probe"
     CUDA_VISIBLE_DEVICES=1 timeout 100 python3 bench/probe_gpu.py --models $W/models --only load > "$OUT/probe.txt" 2>&1)
    wait
    ;;
  warm)
    stamp "compile"; timeout 200 python3 bench/probe_gpu.py --models $W/models --only compile-warm > "$OUT/probe.txt" 2>&1
    ;;
  reference)
    stamp "reference"; bench reference --resolution 720p --rows 8 --tag r720 > "$OUT/r720.txt" 2>&1
    stamp "probe"; timeout 200 python3 bench/probe_gpu.py --models $W/models --only baseline,load,hiding > "$OUT/probe.txt" 2>&1
    ;;
  cold)
    stamp "cold load"; timeout 150 python3 bench/probe_gpu.py --models $W/models --only cold-load > "$OUT/probe.txt" 2>&1
    ;;
  rss)
    stamp "expert rss"; timeout 240 python3 bench/probe_gpu.py --models $W/models --only expert-rss > "$OUT/probe.txt" 2>&1
    ;;
  one)
    stamp "pipeline"; bench pipeline --resolution 720p --rows 8 --wave-rows 8 --gpus 1 --tag p720b8 > "$OUT/p720b8.txt" 2>&1
    ;;
  own)
    stamp "pipeline, no worker"; bench pipeline --resolution 720p --rows 8 --wave-rows 8 --gpus 1 --no-worker \
      --tag p720own > "$OUT/p720own.txt" 2>&1
    ;;
  ref)
    stamp "reference"; bench reference --resolution 720p --rows 8 --tag r720 > "$OUT/r720.txt" 2>&1
    ;;
  final4)
    CUDA_VISIBLE_DEVICES=0 bench pipeline --resolution 720p --rows 8 --wave-rows 8 --gpus 1 --tag p720b8 > "$OUT/p720b8.txt" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 bench reference --resolution 720p --rows 8 --tag r720 > "$OUT/r720.txt" 2>&1 &
    CUDA_VISIBLE_DEVICES=2 bench pipeline --resolution 720p --rows 2 --gpus 1 --int8 --tag p720int8 > "$OUT/p720int8.txt" 2>&1 &
    (CUDA_VISIBLE_DEVICES=3 bench pipeline --resolution 720p --rows 2 --gpus 1 --tag p720bf16 > "$OUT/p720bf16.txt" 2>&1
     stamp "probe"
     CUDA_VISIBLE_DEVICES=3 timeout 150 python3 bench/probe_gpu.py --models $W/models --only compile-warm > "$OUT/probe.txt" 2>&1)
    wait
    ;;
  int8)
    stamp "int8"; bench pipeline --resolution 720p --rows "${2:-2}" --gpus 1 --int8 --activation-slices 8 --tag p720int8 > "$OUT/p720int8.txt" 2>&1
    stamp "bf16"; bench pipeline --resolution 720p --rows "${2:-2}" --gpus 1 --tag p720bf16 > "$OUT/p720bf16.txt" 2>&1
    stamp "probe"; timeout 60 python3 bench/probe_gpu.py --models $W/models --only int8 > "$OUT/probe.txt" 2>&1
    ;;
  last)
    stamp "gpu tests"; timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider -s tests/test_gpu.py > "$OUT/gpu-tests.txt" 2>&1
    stamp "probe"; timeout 150 python3 bench/probe_gpu.py --models $W/models --only expert > "$OUT/probe.txt" 2>&1
    ;;
  check)
    stamp "gpu tests"; timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_kernels.py > "$OUT/gpu-tests.txt" 2>&1
    ;;
  pr)
    stamp "pipeline, then reference"; bench all --resolution 720p --rows "${2:-4}" --gpus 1 --tag p720 > "$OUT/p720.txt" 2>&1
    ;;
  tests)
    stamp "gpu tests"; timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider -s tests/test_gpu.py tests/test_gpu_kernels.py > "$OUT/gpu-tests.txt" 2>&1
    stamp "probe"; timeout 240 python3 bench/probe_gpu.py --models $W/models --only imports,exit > "$OUT/probe.txt" 2>&1
    ;;
  480p|720p)
    CUDA_VISIBLE_DEVICES=0 bench pipeline --resolution "$1" --rows "${2:-8}" --gpus 1 --tag "p$1" > "$OUT/p$1.txt" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 bench reference --resolution "$1" --rows "${2:-8}" --tag "r$1" > "$OUT/r$1.txt" 2>&1
    wait
    ;;
esac
stamp done; tail -n +1 "$OUT"/[cpr]*.txt "$OUT"/gpu-tests.txt 2>/dev/null
[ "${1:-}" = probe ] || (cd $W && tar czf "$OUT/logs-$1.tgz" --exclude='*.png' --exclude='*.mp4' --exclude='*.safetensors' \
   --exclude=images */pipeline/results/logs */pipeline/results/benchmarks */pipeline/snakemake.log) || true
