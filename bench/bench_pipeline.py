"""Benchmark: the stage-split pipeline vs an in-process reference loop, full-size models, one GPU.

No real weights are needed for timing: `models` writes random-weight models of the real sizes
(Wan2.2 A14B expert, Wan2.1 VAE, umT5-XXL) in the official layouts; the two experts are one file
under two names. `pipeline` runs every stage job of an N-row sheet as its own Python process, in
the order `snakemake --cores 1 --resources gpu=1` runs them (prompts, images, all high-noise
steps first by priority, low-noise steps, decode, mp4), and reads each job's log for its time,
model load time and peak memory. `reference` runs the same rows in one process with both experts
loaded once and no artifacts: the fastest possible arrangement. `all` does the three in a row and
prints one table.

    python bench/bench_pipeline.py all --workdir /tmp/bench --resolution 480p --rows 8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from turbowan import stages  # noqa: E402
from turbowan.sizes import PRESETS  # noqa: E402

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


def make_models(folder: Path) -> dict[str, str]:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from safetensors.torch import save_file
    from transformers import UMT5Config, UMT5EncoderModel

    from turbowan.demo import make_tokenizer
    from turbowan.keymaps import dit_key_to_official, t5_key_to_official, vae_key_to_official

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

def stage_jobs(rows: list[dict], models: dict, results: Path, attention: str) -> list[tuple[str, str, dict]]:
    """(stage, key, kwargs) in the order Snakemake runs them on one GPU (priorities: high > low)."""
    jobs = []
    text = {}
    for row in rows:
        key = f"p{len(text)}" if row["prompt"] not in text else None
        if key:
            text[row["prompt"]] = key
            jobs.append(("encode_prompt", key, dict(prompt=row["prompt"], text_encoder=models["text_encoder"],
                                                      tokenizer=models["tokenizer"],
                                                      out=str(results / "prompts" / key / "text.safetensors"))))
    folder = {r["id"]: results / r["id"] for r in rows}
    for r in rows:
        jobs.append(("encode_image", r["id"], dict(image=r["image"], vae=models["vae"],
                                                     out=str(folder[r["id"]] / "cond.safetensors"), video=r["video"])))
    for r in rows:
        jobs.append(("sample_high", r["id"], dict(
            text=str(results / "prompts" / text[r["prompt"]] / "text.safetensors"),
            cond=str(folder[r["id"]] / "cond.safetensors"), expert=models["high"],
            out=str(folder[r["id"]] / "boundary.safetensors"), sampling=r["sampling"], video=r["video"])))
    for r in rows:
        jobs.append(("sample_low", r["id"], dict(
            text=str(results / "prompts" / text[r["prompt"]] / "text.safetensors"),
            cond=str(folder[r["id"]] / "cond.safetensors"), boundary=str(folder[r["id"]] / "boundary.safetensors"),
            expert=models["low"], out=str(folder[r["id"]] / "latent.safetensors"),
            sampling=r["sampling"], video=r["video"], attention=attention)))
    for r in rows:
        jobs.append(("decode", r["id"], dict(latent=str(folder[r["id"]] / "latent.safetensors"), vae=models["vae"],
                                              out_dir=str(folder[r["id"]] / "frames"), video=r["video"])))
        jobs.append(("encode_video", r["id"], dict(frames_dir=str(folder[r["id"]] / "frames"),
                                                    out=str(folder[r["id"]] / "video.mp4"), video=r["video"],
                                                    fps=16, quality=8)))
    return jobs


DONE = re.compile(r"done in ([\d.]+) s; peak host RSS ([\d.]+) GB(?:, peak GPU memory ([\d.]+) GB)?")
LOADED = re.compile(r"loaded (expert|VAE|text encoder) .* in ([\d.]+) s")


def run_pipeline(rows, models, results: Path, attention: str) -> list[dict]:
    """Each stage job in its own process, as Snakemake would start it; returns one record per job."""
    records = []
    for stage, key, kwargs in stage_jobs(rows, models, results, attention):
        log = results / "logs" / stage / f"{key}.log"
        code = ("import json,sys; from turbowan.jobs import run_stage; from turbowan import stages; "
                f"run_stage({stage!r}, {str(log)!r}, getattr(stages, {stage!r}), **json.loads(sys.argv[1]))")
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])})
        wall = time.perf_counter() - started
        if proc.returncode:
            raise SystemExit(f"{stage} {key} failed:\n{proc.stderr[-3000:]}")
        text = log.read_text()
        done = DONE.search(text)
        loads = [float(m[2]) for m in LOADED.finditer(text)]
        records.append(dict(stage=stage, key=key, wall=wall, work=float(done[1]), rss=float(done[2]),
                            gpu=float(done[3] or 0), load=sum(loads)))
        print(f"  {stage:13s} {key:6s} wall {wall:6.1f} s  stage {float(done[1]):6.1f} s  "
              f"load {sum(loads):5.1f} s  GPU {float(done[3] or 0):5.1f} GB  RSS {float(done[2]):5.1f} GB", flush=True)
    return records


# --------------------------------------------------------------------------------------- reference

def run_reference(rows, models, out: Path, attention: str) -> float:
    """All rows in one process: umT5 once, VAE once, both experts loaded once, no artifacts."""
    from turbowan.image import open_rgb, preprocess
    from turbowan.models import load_text_encoder, load_tokenizer, load_transformer, load_vae
    from turbowan.sampler import dit_velocity, sample_single_process
    from turbowan.sizes import latent_shape
    from turbowan.text import encode_text
    from turbowan.vae import decode_frames, encode_condition
    from turbowan.video import save_frames, load_frames, write_mp4

    from turbowan.devices import resolve_device

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
    high = load_transformer(models["high"], dev, attention=attention)
    low = load_transformer(models["low"], dev, attention=attention)
    latents = {}
    for r in rows:
        s = r["sampling"]
        latents[r["id"]] = sample_single_process(
            dit_velocity(high, texts[r["id"]], ys[r["id"]], torch.bfloat16),
            dit_velocity(low, texts[r["id"]], ys[r["id"]], torch.bfloat16),
            latent_shape(**r["video"]), s["seed"], s["num_steps"], s["sigma_max"], s["boundary"], s["ode"], dev)
    del high, low
    torch.cuda.empty_cache()
    for r in rows:
        frames = decode_frames(vae, latents[r["id"]])
        save_frames(frames, out / r["id"] / "frames", {})
        files, _ = load_frames(out / r["id"] / "frames")
        write_mp4(files, out / r["id"] / "video.mp4", r["video"]["width"], r["video"]["height"], 16, 8)
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
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--tiny", action="store_true", help="demo-size models on any device: checks the script")
    args = parser.parse_args()

    models = make_tiny_models(args.workdir / "tiny-models") if args.tiny else make_models(args.workdir / "models")
    if args.what == "models":
        return
    run_dir = args.workdir / f"{args.resolution}-{args.rows}rows-{int(time.time())}"
    rows = make_rows(run_dir, args.rows, args.resolution, args.frames, args.steps, args.tiny)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"card: {card}; torch {torch.__version__}; {args.rows} rows at "
          f"{args.resolution}, {args.frames} frames, {args.steps} steps", flush=True)
    summary = {}
    if args.what in ("pipeline", "all"):
        started = time.perf_counter()
        records = run_pipeline(rows, models, run_dir / "pipeline", args.attention)
        summary["pipeline_s"] = time.perf_counter() - started
        for stage in ("encode_prompt", "encode_image", "sample_high", "sample_low", "decode", "encode_video"):
            mine = [r for r in records if r["stage"] == stage]
            if mine:
                summary[stage] = dict(
                    jobs=len(mine), wall_s=sum(r["wall"] for r in mine), load_s=sum(r["load"] for r in mine),
                    peak_gpu_gb=max(r["gpu"] for r in mine), peak_rss_gb=max(r["rss"] for r in mine))
    if args.what in ("reference", "all"):
        summary["reference_s"] = run_reference(rows, models, run_dir / "reference", args.attention)
    n = args.rows
    print("\n| stage | jobs | wall s | s/video | model load s | peak GPU GB | peak RSS GB |\n|---|---|---|---|---|---|---|")
    for stage, s in summary.items():
        if isinstance(s, dict):
            print(f"| {stage} | {s['jobs']} | {s['wall_s']:.1f} | {s['wall_s'] / n:.1f} | {s['load_s']:.1f} | "
                  f"{s['peak_gpu_gb']:.1f} | {s['peak_rss_gb']:.1f} |")
    if "pipeline_s" in summary:
        print(f"\npipeline: {summary['pipeline_s']:.1f} s, {summary['pipeline_s'] / n:.1f} s per video")
    if "reference_s" in summary:
        print(f"reference loop: {summary['reference_s']:.1f} s, {summary['reference_s'] / n:.1f} s per video")
    if "pipeline_s" in summary and "reference_s" in summary:
        print(f"ratio pipeline / reference: {summary['pipeline_s'] / summary['reference_s']:.2f}")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
