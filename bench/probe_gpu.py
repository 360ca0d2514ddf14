"""Measurements behind the expert and VAE settings, on full-size random-weight models (one GPU).

    python bench/probe_gpu.py --models /tmp/b/models [--resolution 720p] [--only expert,int8,...]

- imports: seconds a worker spends importing torch, diffusers and the stages (each in a fresh process);
- norms: diffusers' / torch's norms against turbodiffusion's FastRMSNorm / FastLayerNorm at the
  expert's activation shape;
- expert: one bf16 SLA forward eager, then compiled (turbowan.wan.compiled): the first call (compile)
  and the steady state, and the first call again in a fresh process (Inductor's cache warm);
- int8: the int8 expert's forward time and peak memory with the feed-forward whole and in 8
  slices, under a 22 GB cap (a 24 GB card less the CUDA context);
- vae: encode and decode of one row, with cuDNN's autotuner off and on;
- exit: how long a process with a compiled expert on the GPU takes to end, normally and by os._exit
  (a worker ends so when idle; a `worker: false` job after every row);
- load: an expert's warm load in fresh processes: as a worker does it, with Python's default GIL
  switch interval, and with diffusers imported beforehand (the load alone);
- hiding: each model library's import, plain and with turbowan.runtime.rows.hide_unused_packages first;
- baseline: a worker's host memory before it loads a model (Python, torch, CUDA context, libraries);
- expert-rss: an expert's host memory in a fresh process (as a worker, or a job with `worker: false`,
  has it) through load, compile and two forwards, cold and warm.
`bench_pipeline.py models [--int8]` writes the models first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from turbowan.wan.sizes import PRESETS, latent_shape  # noqa: E402

GB = 1e9  # bytes: memory is in GB (10^9 bytes) throughout, as the job logs give it
# What a worker imports before its first row (turbowan.runtime.worker): every model stage's module.
WORKER_IMPORTS = "from turbowan.stages import MODEL_STAGES, model_stage; [model_stage(s) for s in MODEL_STAGES]"


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    """Seconds per call (mean over `repeat`, CUDA synchronised) and the last result."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeat, out


def peak(reset: bool = False) -> str:
    text = f"peak allocated {torch.cuda.max_memory_allocated() / GB:.2f} GB, reserved {torch.cuda.max_memory_reserved() / GB:.2f} GB"
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return text


def probe_imports() -> None:
    for what in ("import torch", "import torch; torch.cuda.init()", "from diffusers import WanTransformer3DModel",
                 "from diffusers import AutoencoderKLWan", "from transformers import UMT5EncoderModel",
                 WORKER_IMPORTS):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", what], check=True, cwd=REPO)
        print(f"imports: {what!r}: {time.perf_counter() - started:.2f} s (fresh process)", flush=True)


def probe_import_hiding(repeat: int = 3) -> None:
    """Each model library's import in fresh processes, plain and with turbowan.runtime.rows'
    hide_unused_packages first (what a worker, or a job with `worker: false`, does before its
    imports); seconds from the start of `import torch`."""
    timed = ("import time; t = time.perf_counter(); import torch\n{hide}{what}\n"
             "print(f'{{time.perf_counter() - t:.2f}}')")
    hide = "from turbowan.runtime.rows import hide_unused_packages; hide_unused_packages()\n"
    for what in ("from diffusers import AutoencoderKLWan", "from diffusers import WanTransformer3DModel",
                 "from transformers import UMT5EncoderModel"):
        for label, prefix in (("plain", ""), ("hidden", hide)):
            times = [subprocess.run([sys.executable, "-c", timed.format(hide=prefix, what=what)], check=True, cwd=REPO,
                                    capture_output=True, text=True).stdout.strip() for _ in range(repeat)]
            print(f"import hiding: {what!r} {label}: {' '.join(times)} s", flush=True)


def probe_rss_baseline() -> None:
    """The host memory a worker has before it loads a model: Python, torch with a CUDA context, then
    the stage modules and diffusers' Wan classes (fresh processes)."""
    code = ("import sys; sys.path.insert(0, {repo!r})\n"
            "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()\n{more}\n"
            "from turbowan.progress import host_rss_gb; print('%.2f GB now, %.2f GB peak' % host_rss_gb())")
    math = ("a = torch.randn(4096, 4096, device='cuda', dtype=torch.bfloat16); (a @ a).sum().item()\n"
            "q = torch.randn(1, 8, 1024, 128, device='cuda', dtype=torch.bfloat16)\n"
            "torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().item()\n"
            "c = torch.nn.Conv3d(16, 16, 3).cuda().bfloat16(); c(torch.randn(1, 16, 4, 32, 32, device='cuda', "
            "dtype=torch.bfloat16)).sum().item()")
    imports = ("from turbowan.runtime.rows import hide_unused_packages; hide_unused_packages()\n"
               + WORKER_IMPORTS + "\nfrom diffusers import WanTransformer3DModel, AutoencoderKLWan")
    for label, more in (("python, torch, CUDA context", ""),
                        ("+ cuBLAS, SDPA and cuDNN used once (their code in memory)", math),
                        ("+ the stage modules, diffusers' Wan classes", math + "\n" + imports)):
        out = subprocess.run([sys.executable, "-c", code.format(repo=str(REPO), more=more)], capture_output=True,
                             text=True)
        print(f"rss baseline: {label}: {out.stdout.strip() or out.stderr[-500:]}", flush=True)


def probe_importtime(what: str = "from diffusers import AutoencoderKLWan", top: int = 25) -> None:
    """Where an import's seconds go: python -X importtime, the largest cumulative entries."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", what], capture_output=True, text=True, cwd=REPO)
    rows = []
    for line in out.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), int(parts[0].split(":")[1]), parts[2].rstrip()))
    for cumulative, own, name in sorted(rows, reverse=True)[:top]:
        print(f"importtime {what!r}: {cumulative / 1e6:6.2f} s cumulative, {own / 1e6:5.2f} s own  {name}")


def probe_norms(tokens: int) -> None:
    from diffusers.models.normalization import FP32LayerNorm

    try:
        from turbodiffusion.ops import FastLayerNorm, FastRMSNorm
    except Exception as err:
        print(f"norms: turbodiffusion not importable ({err})")
        return
    x = torch.randn(1, tokens, 5120, device="cuda", dtype=torch.bfloat16)
    rms = torch.nn.RMSNorm(5120, eps=1e-6, device="cuda", dtype=torch.bfloat16)
    fast_rms = FastRMSNorm(5120, eps=1e-6).cuda()
    diff = (rms(x).float() - fast_rms(x).float()).abs().max().item()
    print(f"norms: max diff RMSNorm vs FastRMSNorm {diff:.2e}")
    for name, module in (("torch RMSNorm (bf16 weight)", rms), ("turbodiffusion FastRMSNorm", fast_rms)):
        seconds, out = timed(lambda: module(x), 20)
        print(f"norms: {name}: {seconds * 1e3:.2f} ms per call at [1, {tokens}, 5120]", flush=True)
    ln = FP32LayerNorm(5120, 1e-6, elementwise_affine=False).cuda()
    fast_ln = FastLayerNorm.from_layernorm(ln).cuda()
    diff = (ln(x).float() - fast_ln(x).float()).abs().max().item()
    for name, module in (("diffusers FP32LayerNorm", ln), ("turbodiffusion FastLayerNorm", fast_ln)):
        seconds, _ = timed(lambda: module(x), 20)
        print(f"norms: {name}: {seconds * 1e3:.2f} ms per call (max diff between the two {diff:.2e})", flush=True)


def expert_inputs(model, video: dict) -> tuple:
    _, c, t, h, w = latent_shape(**video)
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 36, t, h, w, device="cuda", dtype=torch.bfloat16, generator=gen)
    text = torch.randn(1, 512, model.config.text_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    step = torch.tensor([900.0], device="cuda", dtype=torch.bfloat16)
    return x, step, text


def forward(model, inputs):
    with torch.no_grad():
        return model(hidden_states=inputs[0], timestep=inputs[1], encoder_hidden_states=inputs[2],
                     return_dict=False)[0]


def probe_expert(path: str, video: dict, fresh_compile: bool) -> None:
    from turbowan.wan.compiled import compile_blocks
    from turbowan.wan.models import load_transformer

    cuda = torch.device("cuda")
    seconds, model = timed(lambda: load_transformer(path, cuda, compile=False, activation_slices=1))
    print(f"expert: load {seconds:.1f} s; {peak(reset=True)}", flush=True)
    inputs = expert_inputs(model, video)
    if not fresh_compile:
        first, eager_out = timed(lambda: forward(model, inputs))
        steady, _ = timed(lambda: forward(model, inputs), 2)
        print(f"expert: eager forward first {first:.2f} s, steady {steady:.2f} s; {peak(reset=True)}", flush=True)
    compile_blocks(model)
    first, compiled_out = timed(lambda: forward(model, inputs))
    print(f"expert: compiled forward, first call (compile{' in a fresh process' if fresh_compile else ''}) "
          f"{first:.1f} s; {compile_counts()}", flush=True)
    if not fresh_compile:
        steady, compiled_out = timed(lambda: forward(model, inputs), 3)
        rel = ((compiled_out.float() - eager_out.float()).norm() / eager_out.float().norm()).item()
        print(f"expert: compiled forward steady {steady:.2f} s; relative difference to eager {rel:.2e}; "
              f"{peak(reset=True)}", flush=True)
    free_gpu()


def probe_expert_rss(models: Path, video_args: list[str]) -> None:
    """An expert's host memory, as a worker has it (unused packages hidden, the expert loaded and
    compiled, two forwards), in two fresh processes: the first fills Inductor's cache, the second
    runs warm, as every later worker does."""
    for run in ("cold cache", "warm cache"):
        proc = subprocess.run([sys.executable, __file__, "--models", str(models), *video_args, "--only",
                               "expert-rss-child"], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RSS")]
        print(f"expert rss ({run}): {' | '.join(lines) or proc.stderr[-800:]}", flush=True)


def expert_rss_child(path: str, video: dict) -> None:
    from turbowan.progress import host_rss_gb
    from turbowan.runtime.rows import hide_unused_packages

    hide_unused_packages()
    from turbowan.wan.models import load_transformer

    model = load_transformer(path, torch.device("cuda"), compile=True)
    print("RSS after load %.2f GB (peak %.2f GB)" % host_rss_gb(), flush=True)
    inputs = expert_inputs(model, video)
    for _ in range(2):
        forward(model, inputs)
    torch.cuda.synchronize()
    print("RSS after two forwards %.2f GB (peak %.2f GB)" % host_rss_gb(), flush=True)


def probe_exit(models: Path, video_args: list[str]) -> None:
    """Seconds from a model process's last line to its end (with `worker: false` the next job waits
    for it; a worker ends so when idle): Python's own exit against os._exit, each with a compiled
    expert on the GPU."""
    for how in ("normal", "os._exit"):
        proc = subprocess.run([sys.executable, __file__, "--models", str(models), *video_args, "--only", "exit-child",
                               "--exit", how], capture_output=True, text=True)
        ended = time.time()
        last = [line for line in proc.stdout.splitlines() if line.startswith("END ")]
        if proc.returncode or not last:
            print(f"exit: {how}: failed ({proc.returncode}): {proc.stderr[-1500:]}", flush=True)
            continue
        print(f"exit: {how}: {ended - float(last[-1].split()[1]):.2f} s from the last line to the process's end",
              flush=True)


def timed_load(path: Path, variant: str) -> str:
    """An expert's load in a fresh process, as a worker does it (the unused packages hidden, diffusers
    imported while the weights stream); variant "switch 0.005" with Python's default GIL switch
    interval instead of turbowan.wan.models', "imported first" with diffusers imported beforehand (the
    load alone). Returns the load's log lines and its time."""
    code = ("import sys, time, torch, logging; logging.basicConfig(level=logging.INFO)\n"
            f"sys.path.insert(0, {str(REPO)!r})\n"
            "from turbowan.runtime.rows import hide_unused_packages; hide_unused_packages()\n"
            "import turbowan.wan.models as m\n"
            f"if {variant!r} == 'switch 0.005': m.STREAM_SWITCH_INTERVAL_S = 0.005\n"
            f"if {variant!r} == 'imported first': import diffusers.models.transformers.transformer_wan\n"
            "torch.cuda.init(); t = time.perf_counter()\n"
            f"m.load_transformer({str(path)!r}, torch.device('cuda'), compile=True)\n"
            "print(f'LOAD {time.perf_counter() - t:.2f} s')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = [line.split(": ", 1)[-1] for line in (proc.stdout + proc.stderr).splitlines()
             if "LOAD" in line or "side by side" in line or "loaded expert" in line]
    return " | ".join(lines) or proc.stderr[-800:]


def probe_load(models: Path) -> None:
    """An expert's warm load (page cache): as a worker does it, with Python's default GIL switch
    interval, and with diffusers imported beforehand (timed_load)."""
    for variant in ("worker", "switch 0.005", "imported first"):
        print(f"load ({variant}): {timed_load(models / 'high.safetensors', variant)}", flush=True)


def resident_fraction(path: Path) -> float:
    """The part of a file's pages in the page cache (mincore over a private mapping, which reads
    nothing)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        vec = (ctypes.c_ubyte * pages)()
        start = ctypes.c_char.from_buffer(mapped)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        del start  # (the mapping closes only once nothing points into it)
    return sum(b & 1 for b in vec) / pages


def probe_cold_load(models: Path) -> None:
    """An expert's load with its file out of the page cache (as after a reboot: written back, then
    its clean pages dropped with POSIX_FADV_DONTNEED), then warm; diffusers imported beforehand so
    the load is timed alone."""
    path = (models / "high.safetensors").resolve()
    for variant in ("cold", "warm"):
        if variant == "cold":
            os.sync()
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        before = resident_fraction(path)
        print(f"load ({variant}; {before:.0%} of the file in the page cache before): "
              f"{timed_load(path, 'imported first')}", flush=True)


def exit_child(path: str, video: dict, how: str) -> None:
    from turbowan.wan.models import load_transformer

    model = load_transformer(path, torch.device("cuda"), compile=True, activation_slices=1)
    forward(model, expert_inputs(model, video))
    torch.cuda.synchronize()
    print(f"END {time.time()}", flush=True)
    if how == "os._exit":
        os._exit(0)


def compile_counts() -> str:
    """What Dynamo did so far: frames traced, graphs made, graph breaks (a recompile per block would
    show as 40 frames)."""
    from torch._dynamo.utils import counters

    return (f"dynamo frames {dict(counters['frames'])}, stats {dict(counters['stats'])}, "
            f"graph breaks {sum(counters['graph_break'].values())}")


def free_gpu() -> None:
    """Drop what compiled graphs still hold (they keep their module alive) and empty the cache."""
    import gc

    import torch._dynamo

    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    print(f"(GPU memory still allocated: {torch.cuda.memory_allocated() / GB:.2f} GB)", flush=True)


def probe_int8(path: str, video: dict) -> None:
    from turbowan.wan.models import load_transformer

    cuda = torch.device("cuda")
    cap = 22e9 / torch.cuda.get_device_properties(0).total_memory
    for chunks, compiled, capped in ((8, False, True), (8, True, True), (1, True, False)):
        torch.cuda.set_per_process_memory_fraction(cap if capped else 1.0)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            seconds, model = timed(lambda: load_transformer(path, cuda, activation_slices=chunks, compile=compiled))
            weights = torch.cuda.memory_allocated() / GB
            inputs = expert_inputs(model, video)
            first, _ = timed(lambda: forward(model, inputs))
            steady, _ = timed(lambda: forward(model, inputs), 2)
            print(f"int8 (activation_slices {chunks}, compile {compiled}, {'under a 22 GB cap' if capped else 'no cap'}): "
                  f"load {seconds:.1f} s, weights {weights:.2f} GB, "
                  f"forward first {first:.2f} s, steady {steady:.2f} s; {peak()}", flush=True)
        except torch.OutOfMemoryError:
            print(f"int8 (activation_slices {chunks}, compile {compiled}): out of memory under the 22 GB cap; {peak()}",
                  flush=True)
        model = inputs = None
        free_gpu()
    torch.cuda.set_per_process_memory_fraction(1.0)


def probe_vae(path: str, video: dict) -> None:
    from turbowan.wan.models import load_vae
    from turbowan.wan.vae import decode_frames, encode_condition

    vae = load_vae(path, torch.device("cuda"), torch.bfloat16)
    image = torch.rand(1, 3, video["height"], video["width"]) * 2 - 1
    latent = torch.randn(*latent_shape(**video), device="cuda")
    for benchmark in (False, True):
        torch.backends.cudnn.benchmark = benchmark
        encode = [timed(lambda: encode_condition(vae, image, video["num_frames"]))[0] for _ in range(2)]
        decode = [timed(lambda: decode_frames(vae, latent))[0] for _ in range(2)]
        print(f"vae (cudnn.benchmark {benchmark}): encode {encode[0]:.2f} then {encode[1]:.2f} s, "
              f"decode {decode[0]:.2f} then {decode[1]:.2f} s; {peak(reset=True)}", flush=True)
    torch.backends.cudnn.benchmark = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--resolution", default="720p", choices=list(PRESETS))
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--only", default="imports,norms,expert,compile-warm,int8,vae,exit")
    parser.add_argument("--exit", default="normal", help="(exit-child) how the child process ends")
    args = parser.parse_args()
    width, height = PRESETS[args.resolution]["16:9"]
    video = dict(width=width, height=height, num_frames=args.frames)
    _, _, t, h, w = latent_shape(**video)
    tokens = t * (h // 2) * (w // 2)
    print(f"card: {torch.cuda.get_device_name()}; torch {torch.__version__}; {args.resolution} {video}: {tokens} tokens",
          flush=True)
    wanted = args.only.split(",")
    if "imports" in wanted:
        probe_imports()
    if "baseline" in wanted:
        probe_rss_baseline()
    if "hiding" in wanted:
        probe_import_hiding()
    if "importtime" in wanted:
        probe_importtime()
    if "norms" in wanted:
        probe_norms(tokens)
    if "int8" in wanted:
        probe_int8(str(args.models / "high-int8.safetensors"), video)
    if "expert" in wanted:
        probe_expert(str(args.models / "high.safetensors"), video, fresh_compile=False)
    if "compile-warm" in wanted:  # a fresh process: what a later job's compile costs
        subprocess.run([sys.executable, __file__, "--models", str(args.models), "--resolution", args.resolution,
                        "--frames", str(args.frames), "--only", "fresh-compile"], check=False)
    if "fresh-compile" in wanted:
        probe_expert(str(args.models / "high.safetensors"), video, fresh_compile=True)
    if "vae" in wanted:
        probe_vae(str(args.models / "vae.safetensors"), video)
    if "load" in wanted:
        probe_load(args.models)
    if "cold-load" in wanted:
        probe_cold_load(args.models)
    if "exit" in wanted:
        probe_exit(args.models, ["--resolution", args.resolution, "--frames", str(args.frames)])
    if "expert-rss" in wanted:
        probe_expert_rss(args.models, ["--resolution", args.resolution, "--frames", str(args.frames)])
    if "expert-rss-child" in wanted:
        expert_rss_child(str(args.models / "high.safetensors"), video)
    if "exit-child" in wanted:
        exit_child(str(args.models / "high.safetensors"), video, args.exit)


if __name__ == "__main__":
    main()
