"""Scale and early results on the CPU demo models (no GPU needed):

- plan: how long `snakemake -n` takes to plan a 1000-row sheet (every row its own prompt);
- order: in a 64-row batch with default settings, how many rows have started sample_high when the
  first mp4 is written (the waves of priorities should deliver videos as the batch goes).

    python bench/cpu_scale.py [--rows-plan 1000] [--rows-run 64] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def workdir(folder: Path, rows: int, frames: int = 5, size: int = 32) -> Path:
    shutil.copytree(REPO / "config" / "demo" / "images", folder / "images", dirs_exist_ok=True)
    lines = ["id,image,prompt,num_frames,width,height,seed"]
    images = ["harbour.png", "cafe.png", "portrait.jpg"]
    lines += [f"r{i:04d},images/{images[i % 3]},prompt number {i},{frames},{size},{size},{i}" for i in range(rows)]
    (folder / "sheet.csv").write_text("\n".join(lines) + "\n")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(sheet="sheet.csv", results="results")
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def snakemake(folder: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(folder),
           "--configfile", str(folder / "config.yaml"), "--cores", "1", "--resources", "gpu=1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True)


def first_time(log: Path) -> datetime:
    match = STAMP.match(log.read_text())
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-plan", type=int, default=1000)
    parser.add_argument("--rows-run", type=int, default=64)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    base = args.workdir or Path(tempfile.mkdtemp(prefix="turbowan-scale-"))

    plan = workdir(base / "plan", args.rows_plan)
    started = time.perf_counter()
    snakemake(plan, "-n", "--quiet", "rules")
    print(f"plan: snakemake -n of {args.rows_plan} rows took {time.perf_counter() - started:.1f} s")

    run = workdir(base / "run", args.rows_run)
    started = time.perf_counter()
    snakemake(run)
    wall = time.perf_counter() - started
    logs = run / "results" / "logs"
    first_mp4 = min(first_time(log) for log in (logs / "encode_video").glob("*.log"))
    high_before = sum(first_time(log) < first_mp4 for log in (logs / "sample_high").glob("*.log"))
    print(f"order: {args.rows_run} rows in {wall:.0f} s; when the first mp4 started, {high_before} of "
          f"{args.rows_run} rows had started sample_high")


if __name__ == "__main__":
    main()
