import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The usual umask, whatever the machine's: tests check that a batch leaves nothing writable by others.
os.umask(0o022)


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory):
    """The demo's tiny models, built once per test session in the official layouts."""
    from turbowan.demo import make_demo_models

    folder = tmp_path_factory.mktemp("models")
    paths = {
        "high": str(folder / "high.safetensors"),
        "low": str(folder / "low.safetensors"),
        "vae": str(folder / "vae.safetensors"),
        "text_encoder": str(folder / "umt5.safetensors"),
        "tokenizer": str(folder / "tokenizer"),
    }
    make_demo_models(**paths, seed=0)
    return paths


def alive(pid: int) -> bool:
    """A process that runs (not gone, not a zombie its parent has yet to reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def prompt_sheet(folder: Path, prompt: str) -> tuple[str, str]:
    """(sheet, prompt key): a one-row sheet holding `prompt`, which encode_prompt reads by key."""
    import csv

    from turbowan.files.prompts import prompt_key

    path = folder / "prompt-sheet.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "image", "prompt"], ["row", "none.png", prompt]])
    return str(path), prompt_key(prompt)


def write_image(path: Path, width: int, height: int, seed: int = 0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8), mode).save(path)
    return path


# SLURM's client commands. Snakemake loads every installed executor plugin on start-up, and the
# SLURM plugin, when it finds `sinfo`, asks `scontrol show config` with a 10 s timeout: on a
# machine with SLURM installed but no controller answering, every run would wait 10 s. So the
# runs that do not test SLURM get a PATH without these.
SLURM_COMMANDS = {"sacct", "sacctmgr", "salloc", "sattach", "sbatch", "sbcast", "scancel", "scontrol",
                  "scrontab", "sdiag", "sinfo", "sprio", "squeue", "sreport", "srun", "sshare", "sstat",
                  "strigger", "sview"}


@functools.cache
def path_without_slurm() -> str:
    """A folder that links every command of /usr/local/bin, /usr/bin, /bin but SLURM's."""
    folder = Path(tempfile.mkdtemp(prefix="turbowan-noslurm-bin-"))
    atexit.register(shutil.rmtree, folder, True)
    for source in ("/usr/local/bin", "/usr/bin", "/bin"):
        if not os.path.isdir(source):
            continue
        for name in os.listdir(source):
            if name not in SLURM_COMMANDS and not (folder / name).exists():
                (folder / name).symlink_to(os.path.join(source, name))
    return str(folder)


def snakemake_command(workdir: Path, *args: str, local: bool = True, extra_env: dict | None = None):
    """The command line and environment that run the workflow in `workdir` (see run_snakemake)."""
    # PYTHONPATH: the jobs import this checkout's turbowan, whatever else is installed.
    system_path = path_without_slurm() if local else "/usr/local/bin:/usr/bin:/bin"
    full_env = {"PATH": f"{BIN}:{system_path}", "HOME": str(workdir), "LC_ALL": "C.UTF-8",
                "PYTHONPATH": str(REPO), **(extra_env or {})}
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir)]
    if local:
        cmd += ["--cores", "1", "--resources", "gpu=1"]
    return [*cmd, *args], full_env


def run_snakemake(workdir: Path, *args: str, check: bool = True, local: bool = True,
                  extra_env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the workflow in `workdir` with the test's virtual environment first on PATH.

    local=True (the default) runs the jobs here, one at a time (`--cores 1 --resources gpu=1`;
    later arguments win), with SLURM's commands hidden; local=False adds no options and keeps
    SLURM's commands, for runs with `--profile profiles/slurm`. `extra_env` adds variables.
    """
    cmd, full_env = snakemake_command(workdir, *args, local=local, extra_env=extra_env)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture
def copy_demo_images(tmp_path):
    def copy(dest: Path) -> Path:
        shutil.copytree(REPO / "config" / "demo" / "images", dest)
        return dest

    return copy


# ------------------------------------------------------------------ end-to-end batches

SHEET = (
    "id,image,prompt,seed,num_frames,width,height,num_steps\n"
    'boat,images/harbour.png,"A boat, leaving ""the"" harbour",1,9,48,32,4\n'
    "face,images/portrait.jpg,Café — 夜,2,5,32,48,3\n"
)


def make_workdir(folder: Path, sheet: str = SHEET) -> Path:
    shutil.copytree(REPO / "config" / "demo" / "images", folder / "images")
    (folder / "sheet.csv").write_text(sheet, encoding="utf-8")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(sheet="sheet.csv", results="results")  # relative: copies of the folder stay self-contained
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def snakemake(folder: Path, *args, check=True, extra_env=None):
    return run_snakemake(folder, "--configfile", str(folder / "config.yaml"), *args, check=check, extra_env=extra_env)


def file_ids(folder: Path) -> dict[str, tuple[int, int]]:
    """Which file every stage artifact and video is (not the pictures, summary and gallery): its inode
    and mtime. A remade artifact is a new file, written beside and renamed into place; the inode alone
    could be the old one's again (Snakemake deletes a job's old outputs before it runs)."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (folder / "results").rglob("*") if p.is_file() and "logs" not in p.parts
            and "benchmarks" not in p.parts and "gallery" not in p.parts and p.suffix in (".safetensors", ".mp4")}


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """A 2-row batch run once; tests work on copies of it."""
    folder = make_workdir(tmp_path_factory.mktemp("batch"))
    snakemake(folder)
    return folder


@pytest.fixture
def batch(finished, tmp_path):
    copy = tmp_path / "batch"
    subprocess.run(["cp", "-a", str(finished), str(copy)], check=True)  # -a: times kept, so nothing looks newer
    return copy


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under <folder>/results: kind, size, mtime, inode (what any change alters)."""
    results = folder / "results"
    if not results.exists():
        return {}
    return {str(p.relative_to(results)): (p.is_dir(), p.lstat().st_size if p.is_file() else 0, p.lstat().st_mtime_ns,
                                          p.lstat().st_ino) for p in sorted(results.rglob("*"))}


def jobs_run(output: str) -> list[str]:
    """The rules of the jobs a Snakemake run started (or a dry run plans), in order, from its output.
    (A dry run shows a model job inside its group, indented: the rules name groups for clusters.)"""
    import re

    return re.findall(r"^ *(?:local)?rule (\w+):$", output, re.M)
