"""Benchmark: the Snakemake pipeline vs an in-process reference loop, full-size models.

No real weights are needed for timing: `models` writes random-weight models of the real sizes
(Wan2.2 A14B expert, Wan2.1 VAE, umT5-XXL) in the official layouts; the two experts are one file
under two names. `pipeline` writes an N-row sheet and config and runs
`snakemake --cores C --resources gpu=G` on it as a user would, then reads every job's log and
Snakemake benchmark: wall time per stage, model load times, peak GPU memory and host RSS, and the
card each GPU job ran on (with a check that no two jobs overlapped on one card). `reference` runs
the same rows in one process with both experts loaded once and no artifacts: the fastest possible
arrangement. `all` does both and prints their ratio.

    python bench/bench_pipeline.py all --workdir /tmp/bench --resolution 480p --rows 8
    CUDA_VISIBLE_DEVICES=0 python bench/bench_pipeline.py pipeline --gpus 1 ...  # pin to one card
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

# Full-size configurations (REFERENCE.md sections 3 and 4).
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

GPU_STAGES = ("encode_prompt", "encode_image", "sample_high", "sample_low", "decode")
STAGES = GPU_STAGES + ("encode_video",)
DONE = re.compile(r"(\w+) done in ([\d.]+) s; peak host RSS ([\d.]+) GB"
                  r"(?:, peak GPU memory ([\d.]+) GB(?: \(reserved ([\d.]+) GB\))?)?")
LOADED = re.compile(r"loaded (expert|VAE|text encoder) .* in ([\d.]+) s")
CARD = re.compile(r"device: cuda:\d+ (.*?) uuid=(\S+)")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def write_batch(folder: Path, rows: list[dict], models: dict, batch_rows: int, attention: str, settings: dict) -> Path:
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
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(sheet=str(folder / "sheet.csv"), results=str(folder / "results"), batch_rows=batch_rows,
                  attention=attention, prepared_models=str(folder / "prepared"), **settings)
    config["models"] = {k: models[k] for k in ("high", "low", "vae", "text_encoder", "tokenizer")}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder / "config.yaml"


def _stamp(line: str) -> float | None:
    import datetime

    match = STAMP.match(line)
    return datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() if match else None


def read_jobs(results: Path) -> list[dict]:
    """One record per job, from its log and Snakemake benchmark: stage, wall time, model loads,
    peak memory, card, start and end."""
    jobs = []
    for stage in STAGES:
        for bench in sorted((results / "benchmarks" / stage).glob("*.tsv")):
            log = results / "logs" / stage / (bench.stem + ".log")
            lines = log.read_text().splitlines()
            done = next((m for line in lines if (m := DONE.search(line)) and m[1] == stage), None)
            card = next((m for line in lines if (m := CARD.search(line))), None)
            stamps = [t for line in lines if (t := _stamp(line))]
            with open(bench) as f:
                header, values = f.readline().split("\t"), f.readline().split("\t")
            wall = float(dict(zip(header, values))["s"])
            jobs.append(dict(stage=stage, group=bench.stem, wall=wall,
                             rows=sum("): " + stage in line and "row " in line for line in lines) or 1,
                             load=sum(float(m[2]) for line in lines if (m := LOADED.search(line))),
                             rss=float(done[3]) if done else float("nan"),
                             gpu=float(done[4] or 0) if done else float("nan"),
                             reserved=float(done[5] or 0) if done else float("nan"),
                             card=(card[2] if card else ""), start=min(stamps), end=max(stamps)))
    return jobs


def check_cards(jobs: list[dict]) -> str:
    """Which cards the GPU jobs ran on, and whether two ever overlapped on one card."""
    gpu_jobs = [j for j in jobs if j["stage"] in GPU_STAGES]
    cards = sorted({j["card"] for j in gpu_jobs})
    clashes = [(a["group"], b["group"]) for i, a in enumerate(gpu_jobs) for b in gpu_jobs[i + 1:]
               if a["card"] == b["card"] and a["start"] < b["end"] and b["start"] < a["end"]]
    side_by_side = sum(1 for i, a in enumerate(gpu_jobs) for b in gpu_jobs[i + 1:]
                       if a["card"] != b["card"] and a["start"] < b["end"] and b["start"] < a["end"])
    return (f"GPU jobs: {len(gpu_jobs)} on {len(cards)} card(s) {cards}; pairs running at once on different "
            f"cards: {side_by_side}; on one card: {len(clashes)} {clashes[:3]}")


def run_pipeline(rows, models, folder: Path, gpus: int, batch_rows: int, attention: str,
                 settings: dict) -> tuple[float, list]:
    """`snakemake --cores N --resources gpu=G` on the rows' sheet, as a user runs it."""
    config = write_batch(folder, rows, models, batch_rows, attention, settings)
    cmd = ["snakemake", *(str(folder / "results" / r["id"] / "video.mp4") for r in rows),  # videos, not the report
           "-s", str(REPO / "Snakefile"), "--directory", str(folder), "--configfile", str(config),
           "--cores", str(4 * gpus + 4), "--resources", f"gpu={gpus}", "--scheduler", "greedy", "--quiet", "rules"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    wall = time.perf_counter() - started
    (folder / "snakemake.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"snakemake failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return wall, read_jobs(folder / "results")


def stage_table(jobs: list[dict], n: int) -> str:
    lines = ["| stage | jobs | job wall s (sum) | s/video | model load s (sum) | peak GPU GB (reserved) | peak RSS GB |",
             "|---|---|---|---|---|---|---|"]
    for stage in STAGES:
        mine = [j for j in jobs if j["stage"] == stage]
        if mine:
            wall = sum(j["wall"] for j in mine)
            lines.append(f"| {stage} | {len(mine)} | {wall:.1f} | {wall / n:.1f} | {sum(j['load'] for j in mine):.1f} | "
                         f"{max(j['gpu'] for j in mine):.1f} ({max(j['reserved'] for j in mine):.1f}) | "
                         f"{max(j['rss'] for j in mine):.1f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- reference

def process_age_s() -> float:
    """Seconds since this process started: its Python start and imports included."""
    started_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    return float(Path("/proc/uptime").read_text().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")


def run_reference(rows, models, out: Path, attention: str, settings: dict) -> float:
    """All rows in one process: umT5 once, VAE once, both experts loaded once, no artifacts. Its
    timer starts after the process has imported torch, diffusers and transformers."""
    from turbowan.wan.image import open_rgb, preprocess
    from turbowan.wan.models import load_text_encoder, load_tokenizer, load_transformer, load_vae
    from turbowan.wan.sampler import dit_velocity, sample_single_process
    from turbowan.wan.sizes import latent_shape
    from turbowan.wan.text import encode_text
    from turbowan.wan.vae import decode_frames, encode_condition
    from turbowan.files.video import save_frames, load_frames, write_mp4

    from turbowan.wan.compiled import compile_wanted
    from turbowan.wan.devices import resolve_device

    # the library's phase timings (loads, steps), as a job's log has them
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)9.0f ms %(name)s: %(message)s")
    dev = resolve_device("auto")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    enc = load_text_encoder(models["text_encoder"], dev)
    tok = load_tokenizer(models["tokenizer"])
    texts = {r["id"]: encode_text(enc, tok, r["prompt"], dev)[0] for r in rows}
    del enc
    torch.cuda.empty_cache()
    vae = load_vae(models["vae"], dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    ys = {r["id"]: encode_condition(vae, preprocess(open_rgb(r["image"]), r["video"]["width"], r["video"]["height"]),
                                    r["video"]["num_frames"]) for r in rows}
    expert = dict(attention=attention, activation_slices=settings["activation_slices"],
                  compile=compile_wanted(settings["compile"], dev))
    high = load_transformer(models["high"], dev, **expert)
    low = load_transformer(models["low"], dev, **expert)
    latents = {}
    for r in rows:
        s = r["sampling"]
        latents[r["id"]] = sample_single_process(
            dit_velocity(high, texts[r["id"]], ys[r["id"]], torch.bfloat16),
            dit_velocity(low, texts[r["id"]], ys[r["id"]], torch.bfloat16),
            latent_shape(**r["video"]), s["seed"], s["num_steps"], s["sigma_max"], s["boundary"], s["ode"], dev)
    del high, low
    torch.cuda.empty_cache()

    def frames_and_mp4(r: dict, frames: torch.Tensor) -> None:
        save_frames(frames, out / r["id"] / "frames", {})
        files, _ = load_frames(out / r["id"] / "frames")
        write_mp4(files, out / r["id"] / "video.mp4", r["video"]["width"], r["video"]["height"], 16, 8)

    with ThreadPoolExecutor(max_workers=4) as cpu:  # frames and mp4s are written while the GPU decodes on
        made = [cpu.submit(frames_and_mp4, r, decode_frames(vae, latents[r["id"]])) for r in rows]
        for future in made:
            future.result()
    sync()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["models", "pipeline", "reference", "all"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/turbowan-bench"))
    parser.add_argument("--resolution", default="480p", choices=list(PRESETS))
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--gpus", type=int, default=1, help="the pipeline's --resources gpu=N")
    parser.add_argument("--batch-rows", type=int, default=4)
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--int8", action="store_true", help="int8 experts (written from the bf16 one)")
    parser.add_argument("--activation-slices", default="auto", help="config activation_slices")
    parser.add_argument("--compile", default="auto", help="config compile: auto | true | false")
    parser.add_argument("--fork-server", action=argparse.BooleanOptionalAction, default=True,
                        help="config fork_server: model jobs forked from one process that imported once")
    parser.add_argument("--tag", default="", help="name of this run's folder (default: resolution, rows, time)")
    parser.add_argument("--tiny", action="store_true", help="demo-size models on any device: checks the script")
    args = parser.parse_args()

    from turbowan.jobs import hide_unused_packages

    hide_unused_packages()  # as the pipeline's model jobs do, before this process imports diffusers
    from diffusers import AutoencoderKLWan, WanTransformer3DModel  # noqa: F401
    from transformers import UMT5EncoderModel  # noqa: F401

    imports_s = process_age_s()  # what the reference's timer leaves out: Python's start and these imports
    models = (make_tiny_models(args.workdir / "tiny-models") if args.tiny
              else make_models(args.workdir / "models", args.int8))
    activation_slices = args.activation_slices if args.activation_slices == "auto" else int(args.activation_slices)
    compile_setting = {"true": True, "false": False}.get(args.compile, args.compile)
    settings = {"activation_slices": activation_slices, "compile": compile_setting, "fork_server": args.fork_server}
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
        wall, jobs = run_pipeline(rows, models, run_dir / "pipeline", args.gpus, args.batch_rows, args.attention,
                                  settings)
        summary.update(pipeline_s=wall, jobs=jobs)
        print(f"pipeline (--resources gpu={args.gpus}, batch_rows {args.batch_rows}): {wall:.1f} s, "
              f"{wall / n:.1f} s per video")
        print(stage_table(jobs, n))
        print(check_cards(jobs))
        for j in jobs:
            print(f"  {j['stage']:13s} {j['group']:14s} rows {j['rows']} wall {j['wall']:6.1f} s load {j['load']:5.1f} s "
                  f"GPU {j['gpu']:5.1f} GB RSS {j['rss']:5.1f} GB card {j['card'][-8:]}")
    if args.what in ("reference", "all"):
        summary["reference_s"] = run_reference(rows, models, run_dir / "reference", args.attention, settings)
        summary["reference_imports_s"] = imports_s
        print(f"reference loop: {summary['reference_s']:.1f} s, {summary['reference_s'] / n:.1f} s per video; "
              f"its process's start and imports before that: {imports_s:.1f} s")
    if "pipeline_s" in summary and "reference_s" in summary:
        print(f"ratio pipeline / reference: {summary['pipeline_s'] / summary['reference_s']:.2f} "
              f"({summary['pipeline_s'] / (summary['reference_s'] + imports_s):.2f} with its start and imports)")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
