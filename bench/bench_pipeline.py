"""Benchmark: the Snakemake pipeline vs an in-process reference loop, full-size models.

No real weights are needed for timing: `models` writes random-weight models of the real sizes
(Wan2.2 A14B expert, Wan2.1 VAE, umT5-XXL) in the official layouts; the two experts are one file
under two names. `pipeline` writes an N-row sheet and config and runs
`snakemake --cores 1 --resources gpu=1` on it as a user would (--cores, --gpus change the two
numbers), then reads every job's log and Snakemake benchmark: wall time per stage, model loads,
peak GPU memory and host RSS, and the card each model job ran on (with a check that no two jobs
overlapped on one card). `reference` runs the same rows in one process through the same stage
functions with one StageContext, so each model is loaded once (as far as memory allows) and no
job, worker or Snakemake is in the way: the fastest arrangement of the same work. `all` does both
and prints their ratio.

    python bench/bench_pipeline.py all --workdir /tmp/bench --resolution 480p --rows 8
    CUDA_VISIBLE_DEVICES=0 python bench/bench_pipeline.py pipeline ...  # pin to one card
    python bench/bench_pipeline.py all --tiny --frames 5 --rows 2      # the demo's models: checks the script
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from turbowan.wan.sizes import PRESETS  # noqa: E402

# Full-size configurations (docs/reference.md, "Checkpoint files" and "Mapping onto diffusers and transformers").
A14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu")
PROMPTS = ["A boat leaves the harbour at dawn, gulls circling", "A cat walks along a wall in the rain",
           "Neon signs flicker over a wet street at night", "A dancer turns slowly, her dress flowing"]


def _random_state(module: torch.nn.Module, device: str) -> dict[str, torch.Tensor]:
    """Random bf16 weights for every parameter, made directly on the GPU (no fp32 copy of 14B)."""
    state = {}
    for name, param in module.named_parameters():
        t = torch.empty(param.shape, dtype=torch.bfloat16, device=device)
        if name.endswith(("norm_q.weight", "norm_k.weight")) or ".norm" in name and name.endswith("weight"):
            t.fill_(1.0)
        elif name.endswith("bias"):
            t.zero_()
        else:
            t.normal_(0.0, 0.02)
        state[name] = t
    return state


def write_int8_expert(bf16: Path, out: Path) -> None:
    """The bf16 expert in TurboDiffusion's int8 format, quantised on the GPU one tensor at a time."""
    from safetensors.torch import save_file

    from turbowan.wan.int8 import quantize_expert
    from turbowan.files.safetensors_io import SafetensorsFile

    started = time.perf_counter()
    tensors = {}
    with SafetensorsFile(bf16) as f:
        for key in f.keys():
            tensors.update({k: v.cpu() for k, v in quantize_expert({key: f.get_tensor(key).cuda()}).items()})
    save_file(tensors, str(out))
    print(f"int8 expert written in {time.perf_counter() - started:.0f} s: {out}", flush=True)


def make_models(folder: Path, int8: bool = False) -> dict[str, str]:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from safetensors.torch import save_file
    from transformers import UMT5Config, UMT5EncoderModel

    from turbowan.demo import make_tokenizer
    from turbowan.wan.keymaps import dit_key_to_official, t5_key_to_official, vae_key_to_official

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"high": folder / "high.safetensors", "low": folder / "low.safetensors",
             "vae": folder / "vae.safetensors", "text_encoder": folder / "umt5.safetensors",
             "tokenizer": folder / "tokenizer"}
    started = time.perf_counter()
    if not paths["high"].exists() or "proj_l" not in open(paths["high"], "rb").read(200_000).decode("latin-1"):
        paths["low"].unlink(missing_ok=True)
        with init_empty_weights():
            dit = WanTransformer3DModel(**A14B)
        state = _random_state(dit, "cuda")
        official = {}
        for key, value in state.items():
            if key == "patch_embedding.weight":
                value = value.reshape(value.shape[0], -1)
            official[dit_key_to_official(key)] = value.cpu()
        for i in range(A14B["num_layers"]):  # SLA's proj_l, as TurboDiffusion's experts carry it
            prefix = f"blocks.{i}.self_attn.attn_op.local_attn.proj_l"
            official[f"{prefix}.weight"] = (torch.randn(128, 128) * 0.02).to(torch.bfloat16)
            official[f"{prefix}.bias"] = torch.zeros(128, dtype=torch.bfloat16)
        del state
        save_file(official, str(paths["high"]))
        del official
    if not paths["low"].exists():
        os.link(paths["high"], paths["low"])  # same weights under the low expert's name
    if int8:
        paths["high"], paths["low"] = folder / "high-int8.safetensors", folder / "low-int8.safetensors"
        if not paths["high"].exists():
            write_int8_expert(folder / "high.safetensors", paths["high"])
        if not paths["low"].exists():
            os.link(paths["high"], paths["low"])
    if not paths["text_encoder"].exists():
        with init_empty_weights():
            t5 = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
        state = _random_state(t5, "cuda")
        state.pop("encoder.embed_tokens.weight", None)
        save_file({t5_key_to_official(k): v.cpu() for k, v in state.items()}, str(paths["text_encoder"]))
        del state
    if not paths["vae"].exists():
        torch.manual_seed(0)
        vae = AutoencoderKLWan()
        save_file({vae_key_to_official(k): v.float().contiguous() for k, v in vae.state_dict().items()},
                  str(paths["vae"]))
    if not paths["tokenizer"].exists():
        make_tokenizer(paths["tokenizer"])
    torch.cuda.empty_cache()
    print(f"models ready in {time.perf_counter() - started:.0f} s: {folder}", flush=True)
    return {k: str(v) for k, v in paths.items()}


def make_tiny_models(folder: Path) -> dict[str, str]:
    """The demo's tiny models: checks the benchmark itself on a CPU (no timing value)."""
    from turbowan.demo import make_demo_models

    paths = {"high": "high.safetensors", "low": "low.safetensors", "vae": "vae.safetensors",
             "text_encoder": "umt5.safetensors", "tokenizer": "tokenizer"}
    paths = {k: str(folder / v) for k, v in paths.items()}
    if not Path(paths["high"]).exists():
        make_demo_models(**paths)
    return paths


def make_rows(folder: Path, n: int, resolution: str, frames: int, steps: int, tiny: bool = False) -> list[dict]:
    from PIL import Image

    width, height = (48, 32) if tiny else PRESETS[resolution]["16:9"]
    rows = []
    for i in range(n):
        image = folder / "images" / f"row{i}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image)
        rows.append(dict(id=f"row{i}", image=str(image), prompt=PROMPTS[i % len(PROMPTS)] + f" #{i}",
                         video=dict(width=width, height=height, num_frames=frames),
                         sampling=dict(seed=i, num_steps=steps, sigma_max=200.0, boundary=0.9, ode=False)))
    return rows


# ---------------------------------------------------------------------------------------- pipeline

MODEL_STAGES = ("encode_prompt", "encode_image", "sample_high", "sample_low", "decode")
STAGES = MODEL_STAGES + ("encode_video",)
# A model stage's last line (turbowan.runtime.rows), or a CPU job's (turbowan.runtime.jobs.run_cpu_job).
DONE = re.compile(r"\b(\w+) done in ([\d.]+) s; (?:host RSS [\d.]+ GB \(process peak ([\d.]+) GB\)|peak host RSS ([\d.]+) GB)"
                  r"(?:, peak GPU memory ([\d.]+) GB \(reserved ([\d.]+) GB\))?")
LOADED = re.compile(r"loaded (expert|VAE|text encoder) .* in ([\d.]+) s")
CARD = re.compile(r"gpu: card (\d+).*? uuid=([^,\s]+)")
GPU_LINE = re.compile(r"(gpu: .*)$")
WORKER = re.compile(r" in worker pid (\d+)")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def base_config() -> dict:
    """The repository's config, which the pipeline runs with and the reference loop copies."""
    import yaml

    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def write_batch(folder: Path, rows: list[dict], models: dict, attention: str, settings: dict) -> Path:
    """The sheet and config a user would write for these rows; returns the config file."""
    import csv

    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "sheet.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image", "prompt", "seed", "num_frames", "width", "height", "num_steps"])
        for r in rows:
            writer.writerow([r["id"], r["image"], r["prompt"], r["sampling"]["seed"], r["video"]["num_frames"],
                             r["video"]["width"], r["video"]["height"], r["sampling"]["num_steps"]])
    config = base_config()
    config.update(sheet=str(folder / "sheet.csv"), results=str(folder / "results"), attention=attention,
                  prepared_models=str(folder / "prepared"), **settings)
    config["models"] = {k: models[k] for k in ("high", "low", "vae", "text_encoder", "tokenizer")}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder / "config.yaml"


def _stamp(line: str) -> float | None:
    import datetime

    match = STAMP.match(line)
    return datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() if match else None


def read_jobs(results: Path) -> list[dict]:
    """One record per job (a row's or a prompt's stage), from its log and Snakemake benchmark: stage,
    key, wall time, model loads, peak memory, card, the worker that ran it, start and end."""
    jobs = []
    for stage in STAGES:
        for bench in sorted((results / "benchmarks" / stage).glob("*.tsv")):
            log = results / "logs" / stage / (bench.stem + ".log")
            lines = log.read_text().splitlines()
            done = next((m for line in lines if (m := DONE.search(line)) and m[1] == stage), None)
            card = next((m for line in lines if (m := CARD.search(line))), None)
            gpu_line = next((m for line in lines if (m := GPU_LINE.search(line))), None)
            worker = next((m for line in lines if (m := WORKER.search(line))), None)
            stamps = [t for line in lines if (t := _stamp(line))]
            with open(bench) as f:
                header, values = f.readline().split("\t"), f.readline().split("\t")
            wall = float(dict(zip(header, values))["s"])
            rss = (done[3] or done[4]) if done else None
            jobs.append(dict(stage=stage, key=bench.stem, wall=wall,
                             loads=sum(1 for line in lines if LOADED.search(line)),
                             load=sum(float(m[2]) for line in lines if (m := LOADED.search(line))),
                             rss=float(rss) if rss else float("nan"),
                             gpu=float(done[5] or 0) if done else float("nan"),
                             reserved=float(done[6] or 0) if done else float("nan"),
                             card=card[2] if card else (gpu_line[1] if gpu_line else ""),
                             worker=int(worker[1]) if worker else None,
                             start=min(stamps), end=max(stamps)))
    return jobs


def check_cards(jobs: list[dict]) -> str:
    """Which cards the model jobs ran on, and whether two ever overlapped on one card."""
    gpu_jobs = [j for j in jobs if j["stage"] in MODEL_STAGES]
    cards = sorted({j["card"] for j in gpu_jobs})
    workers = sorted({j["worker"] for j in gpu_jobs if j["worker"] is not None})
    clashes = [(f"{a['stage']}:{a['key']}", f"{b['stage']}:{b['key']}") for i, a in enumerate(gpu_jobs)
               for b in gpu_jobs[i + 1:] if a["card"] == b["card"] and a["start"] < b["end"] and b["start"] < a["end"]]
    side_by_side = sum(1 for i, a in enumerate(gpu_jobs) for b in gpu_jobs[i + 1:]
                       if a["card"] != b["card"] and a["start"] < b["end"] and b["start"] < a["end"])
    return (f"model jobs: {len(gpu_jobs)} on {len(cards)} card(s) {cards}, served by {len(workers)} worker(s) "
            f"{workers}; pairs running at once on different cards: {side_by_side}; on one card: {len(clashes)} "
            f"{clashes[:3]}")


def run_pipeline(rows, models, folder: Path, cores: int, gpus: int, attention: str,
                 settings: dict) -> tuple[float, list]:
    """`snakemake --cores C --resources gpu=G` (1 and 1 unless asked) on the rows' sheet, as a user
    runs it: the default target, so the pictures and the gallery too."""
    config = write_batch(folder, rows, models, attention, settings)
    cmd = ["snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(folder), "--configfile", str(config),
           "--cores", str(cores), "--resources", f"gpu={gpus}"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    wall = time.perf_counter() - started
    (folder / "snakemake.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"snakemake failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return wall, read_jobs(folder / "results")


def stage_table(jobs: list[dict], n: int) -> str:
    lines = ["| stage | jobs | job wall s (sum) | s/video | model loads (s, sum) | peak GPU GB (reserved) | peak RSS GB |",
             "|---|---|---|---|---|---|---|"]
    for stage in STAGES:
        mine = [j for j in jobs if j["stage"] == stage]
        if mine:
            wall = sum(j["wall"] for j in mine)
            lines.append(f"| {stage} | {len(mine)} | {wall:.1f} | {wall / n:.1f} | "
                         f"{sum(j['loads'] for j in mine)} ({sum(j['load'] for j in mine):.1f}) | "
                         f"{max(j['gpu'] for j in mine):.1f} ({max(j['reserved'] for j in mine):.1f}) | "
                         f"{max(j['rss'] for j in mine):.1f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- reference

def process_age_s() -> float:
    """Seconds since this process started: its Python start and imports included."""
    started_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    return float(Path("/proc/uptime").read_text().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")


def run_reference(rows, models, out: Path, attention: str, settings: dict) -> float:
    """All rows in this process through the pipeline's stage functions, with one StageContext: every
    model is loaded once (as far as the card's memory keeps them), no job, worker or Snakemake in
    between. Stage by stage over all rows, as a wave runs; each mp4 is written on a CPU thread while
    the next row decodes. The settings are the pipeline's (the repository's config, plus this run's).
    Its timer starts after the process has imported torch, diffusers and transformers."""
    from turbowan.files.prompts import prompt_key
    from turbowan.stages.conditioning import encode_image
    from turbowan.stages.context import StageContext
    from turbowan.stages.decoding import decode
    from turbowan.stages.prompt import encode_prompt
    from turbowan.stages.sampling import sample_high, sample_low
    from turbowan.stages.video import encode_video
    from turbowan.wan.devices import resolve_device

    config = {**base_config(), "attention": attention, **settings}
    device = config["device"]
    model_args = dict(device=device, dtype=config["dtype"])
    vae_args = dict(device=device, vae_dtype=config["vae_dtype"])
    expert_args = dict(model_args, attention=attention, sla_topk=config["sla_topk"],
                       activation_slices=config["activation_slices"], compile=config["compile"])
    fps, quality = config["video"]["fps"], config["video"]["quality"]
    # the library's phase timings (loads, steps), as a job's log has them
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)9.0f ms %(name)s: %(message)s")
    dev = resolve_device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def path(r: dict, name: str) -> str:
        return str(out / r["id"] / name)

    sheet = write_batch(out, rows, models, attention, settings).with_name("sheet.csv")  # (prompts by key)
    sync()
    started = time.perf_counter()
    ctx = StageContext()
    for r in rows:
        encode_prompt(str(sheet), prompt_key(r["prompt"]), models["text_encoder"], models["tokenizer"],
                      path(r, "text.safetensors"), **model_args, ctx=ctx)
    for r in rows:
        encode_image(r["image"], models["vae"], path(r, "cond.safetensors"), r["video"], **vae_args, ctx=ctx)
    for r in rows:
        sample_high(path(r, "text.safetensors"), path(r, "cond.safetensors"), models["high"],
                    path(r, "boundary.safetensors"), r["sampling"], r["video"], **expert_args, ctx=ctx)
    for r in rows:
        sample_low(path(r, "text.safetensors"), path(r, "cond.safetensors"), path(r, "boundary.safetensors"),
                   models["low"], path(r, "latent.safetensors"), r["sampling"], r["video"], **expert_args, ctx=ctx)
    with ThreadPoolExecutor(max_workers=4) as cpu:  # mp4s are written while the GPU decodes on
        made = []
        for r in rows:
            decode(path(r, "latent.safetensors"), models["vae"], path(r, "frames"), r["video"], **vae_args, ctx=ctx)
            made.append(cpu.submit(encode_video, path(r, "frames"), path(r, "video.mp4"), r["video"], fps, quality))
        for future in made:
            future.result()
    sync()
    return time.perf_counter() - started


def same_latents(pipeline: Path, reference: Path, rows: list[dict]) -> str:
    """Whether the reference loop's final latents equal the pipeline's, bit for bit (same stage code,
    same settings: they should)."""
    from safetensors.torch import load_file

    equal = [r["id"] for r in rows
             if torch.equal(load_file(pipeline / r["id"] / "latent.safetensors")["x"],
                            load_file(reference / r["id"] / "latent.safetensors")["x"])]
    return f"latents equal to the pipeline's: {len(equal)} of {len(rows)} rows"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["models", "pipeline", "reference", "all"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/turbowan-bench"))
    parser.add_argument("--resolution", default="480p", choices=list(PRESETS))
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cores", type=int, default=1, help="the pipeline's --cores N")
    parser.add_argument("--gpus", type=int, default=1, help="the pipeline's --resources gpu=N")
    parser.add_argument("--wave-rows", type=int, default=None, help="config wave_rows (default: the config's)")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--int8", action="store_true", help="int8 experts (written from the bf16 one)")
    parser.add_argument("--activation-slices", default="auto", help="config activation_slices")
    parser.add_argument("--compile", default="auto", help="config compile: auto | true | false")
    parser.add_argument("--worker", action=argparse.BooleanOptionalAction, default=True,
                        help="config worker: model jobs hand their rows to a resident worker per card "
                             "(--no-worker: every model job loads its models in its own process)")
    parser.add_argument("--tag", default="", help="name of this run's folder (default: resolution, rows, time)")
    parser.add_argument("--tiny", action="store_true", help="demo-size models on any device: checks the script")
    args = parser.parse_args()

    from turbowan.runtime.rows import hide_unused_packages

    hide_unused_packages()  # as the pipeline's workers and model jobs do, before this process imports diffusers
    from diffusers import AutoencoderKLWan, WanTransformer3DModel  # noqa: F401
    from transformers import UMT5EncoderModel  # noqa: F401

    imports_s = process_age_s()  # what the reference's timer leaves out: Python's start and these imports
    models = (make_tiny_models(args.workdir / "tiny-models") if args.tiny
              else make_models(args.workdir / "models", args.int8))
    activation_slices = args.activation_slices if args.activation_slices == "auto" else int(args.activation_slices)
    compile_setting = {"true": True, "false": False}.get(args.compile, args.compile)
    settings = {"activation_slices": activation_slices, "compile": compile_setting, "worker": args.worker}
    if args.wave_rows:
        settings["wave_rows"] = args.wave_rows
    if args.what == "models":
        return
    run_dir = args.workdir / (args.tag or f"{args.resolution}-{args.rows}rows-{int(time.time())}")
    rows = make_rows(run_dir, args.rows, args.resolution, args.frames, args.steps, args.tiny)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"card: {card} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}); torch "
          f"{torch.__version__}; {args.rows} rows at {args.resolution}, {args.frames} frames, {args.steps} steps; "
          f"experts {'int8' if args.int8 else 'bf16'}, {settings}",
          flush=True)
    n, summary = args.rows, {}
    if args.what in ("pipeline", "all"):
        wall, jobs = run_pipeline(rows, models, run_dir / "pipeline", args.cores, args.gpus, args.attention, settings)
        summary.update(pipeline_s=wall, jobs=jobs)
        print(f"pipeline (--cores {args.cores} --resources gpu={args.gpus}, {settings}): {wall:.1f} s, "
              f"{wall / n:.1f} s per video")
        print(stage_table(jobs, n))
        print(check_cards(jobs))
        for j in jobs:
            print(f"  {j['stage']:13s} {j['key']:16s} wall {j['wall']:6.1f} s loads {j['loads']} ({j['load']:5.1f} s) "
                  f"GPU {j['gpu']:5.1f} GB RSS {j['rss']:5.1f} GB card {j['card'][-8:]} worker {j['worker']}")
    if args.what in ("reference", "all"):
        summary["reference_s"] = run_reference(rows, models, run_dir / "reference", args.attention, settings)
        summary["reference_imports_s"] = imports_s
        print(f"reference loop: {summary['reference_s']:.1f} s, {summary['reference_s'] / n:.1f} s per video; "
              f"its process's start and imports before that: {imports_s:.1f} s")
    if "pipeline_s" in summary and "reference_s" in summary:
        print(same_latents(run_dir / "pipeline" / "results", run_dir / "reference", rows))
        print(f"ratio pipeline / reference: {summary['pipeline_s'] / summary['reference_s']:.2f} "
              f"({summary['pipeline_s'] / (summary['reference_s'] + imports_s):.2f} with its start and imports)")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
