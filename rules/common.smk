# The sheet, paths and input functions shared by every rule.
import os
import sys

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

# The `turbowan` library of this checkout, importable without installing it. (Scripts find it
# through the scripts/turbowan link: Snakemake puts a script's folder on its sys.path.)
sys.path.insert(0, workflow.basedir)

from turbowan.files.artifacts import sweep  # noqa: E402
from turbowan.batch import collect_garbage  # noqa: E402
from turbowan.files.formats import CheckpointError  # noqa: E402
from turbowan import forkserver  # noqa: E402
from turbowan.files.modelfiles import plan_models  # noqa: E402
from turbowan.sheet import SheetError, check_defaults, load_schema, read_rows  # noqa: E402

RESULTS = config["results"].rstrip("/")
MODELS = config["models"]

try:
    check_defaults(config["defaults"])
    ROWS = {
        row.id: row
        for row in read_rows(
            config["sheet"],
            config["defaults"],
            load_schema(os.path.join(workflow.basedir, "config/schemas/sheet.schema.yaml")),
            decode_images=workflow.is_main_process,
        )
    }
except SheetError as err:
    raise WorkflowError(str(err)) from None
PROMPTS = {row.prompt_key: row.prompt for row in ROWS.values()}


wildcard_constraints:
    id="[A-Za-z0-9._-]+",
    prompt_key="[0-9a-f]{16}",


def row_dir(name):
    """A path pattern in a row's results folder."""
    return f"{RESULTS}/{{id}}/{name}"


def log_path(rule_name, key="{id}"):
    return f"{RESULTS}/logs/{rule_name}/{key}.log"


def start_fork_server():
    """A local run's model jobs run in workers of one process that imported torch, diffusers and
    transformers once (turbowan.forkserver), unless config says fork_server: false. Cluster jobs
    run on other hosts and import their own."""
    if config["fork_server"] and workflow.local_exec:
        forkserver.start(f"{RESULTS}/logs/fork_server.log")


def benchmark_path(rule_name, key="{id}"):
    return f"{RESULTS}/benchmarks/{rule_name}/{key}.tsv"


def frugal_level(wildcards, attempt):
    """0 on the first attempt; a retried job (say, after running out of GPU memory) saves memory."""
    return attempt - 1


def text_path(prompt_key):
    return f"{RESULTS}/prompts/{prompt_key}/text.safetensors"


def row_path(row_id, name):
    return f"{RESULTS}/{row_id}/{name}"


def text_for_row(row_id):
    return text_path(ROWS[row_id].prompt_key)


def video_params(wildcards):
    return ROWS[wildcards.id].video()


# Groups: each GPU stage runs as one job per group of up to `batch_rows` consecutive rows (unique
# prompts for encode_prompt), which loads its model once. A group is named by its first and last
# key ("r1~r4"; a group of one by its key), and so are its rule (`sample_high_r1~r4`) and log.
# Each row's result goes through a store under <results>/.store (turbowan.batch), so a rerun of a
# group computes only the rows that changed or never finished.
BATCH_ROWS = config["batch_rows"]
STORE = f"{RESULTS}/.store"


def clean_store():
    """After a run that succeeded: drop store entries no output uses (see turbowan.batch)."""
    removed, freed = collect_garbage(STORE)
    if removed:
        logger.info(f"Store: removed {removed} entries no output uses ({freed / 1e6:.0f} MB)")


def groups_of(keys, size):
    """{group name: [keys]}: consecutive keys, `size` at a time."""
    keys = list(keys)
    chunks = [keys[i : i + size] for i in range(0, len(keys), size)]
    return {(c[0] if len(c) == 1 else f"{c[0]}~{c[-1]}"): c for c in chunks}


ROW_GROUPS = groups_of(ROWS, BATCH_ROWS)
PROMPT_GROUPS = groups_of(PROMPTS, BATCH_ROWS)

# What a GPU job of each stage asks a cluster for (a local run looks only at `gpu`): host memory in
# MB, and run time in minutes for starting (imports, model load) plus each row of its group. Both
# grow with the attempt (a retry). Estimates for 720p; the config's `job_resources` overrides them.
JOB_RESOURCES = {
    "encode_prompt": {"mem_mb": 16000, "start_min": 10, "per_row_min": 1},
    "encode_image": {"mem_mb": 8000, "start_min": 5, "per_row_min": 1},
    "sample_high": {"mem_mb": 16000, "start_min": 10, "per_row_min": 5},
    "sample_low": {"mem_mb": 16000, "start_min": 10, "per_row_min": 5},
    "decode": {"mem_mb": 12000, "start_min": 5, "per_row_min": 2},
}


def group_resources(stage, rows):
    """The `resources:` of one group job of `stage` serving `rows` rows."""
    spec = {**JOB_RESOURCES[stage], **config["job_resources"].get(stage, {})}
    return {
        "gpu": 1,
        "mem_mb": lambda wildcards, attempt: spec["mem_mb"] * attempt,
        "runtime": lambda wildcards, attempt: (spec["start_min"] + spec["per_row_min"] * rows) * attempt,
        "frugal": frugal_level,
    }


def frames_output(row_id):
    """Decoded frames are temporary unless the config keeps them."""
    frames = directory(row_path(row_id, "frames"))
    return frames if config["keep_frames"] else temp(frames)


def artifacts_and_products():
    """{stage artifact: [files made from it]} for this sheet (a prompt's text feeds several rows)."""
    products = {}
    for row_id, row in ROWS.items():
        folder = f"{RESULTS}/{row_id}"
        boundary, latent = f"{folder}/boundary.safetensors", f"{folder}/latent.safetensors"
        after_latent = [f"{folder}/frames", f"{folder}/video.mp4"]
        text = f"{RESULTS}/prompts/{row.prompt_key}/text.safetensors"
        products.setdefault(text, []).extend([boundary, latent, *after_latent])
        products[f"{folder}/cond.safetensors"] = [boundary, latent, *after_latent]
        products[boundary] = [latent, *after_latent]
        products[latent] = after_latent
        products[f"{folder}/frames"] = [f"{folder}/video.mp4"]  # (a failed row's frames: a failure record)
    return products.items()


def all_videos():
    return expand(f"{RESULTS}/{{id}}/video.mp4", id=ROWS)


# The demo models are made by rule make_demo_models; any other model file must exist already
# (or be listed under `download`). A .pth is converted once by prepare_models; every file that
# exists is recognised now, so a wrong one stops the run before any job starts.
DEMO_MODELS = {
    "high": "resources/demo-models/high_noise.safetensors",
    "low": "resources/demo-models/low_noise.safetensors",
    "vae": "resources/demo-models/Wan2.1_VAE.safetensors",
    "text_encoder": "resources/demo-models/umt5-encoder.safetensors",
    "tokenizer": "resources/demo-models/umt5-tokenizer",
}
PREPARED = config["prepared_models"].rstrip("/")
try:
    MODEL_PLAN = plan_models(MODELS, PREPARED, DEMO_MODELS, config["download"], check=workflow.is_main_process)
except CheckpointError as err:
    raise WorkflowError(str(err)) from None
if MODEL_PLAN.problems:
    raise WorkflowError("model files (check the config's `models`):\n  " + "\n  ".join(MODEL_PLAN.problems))
# role -> the file the stages read (the prepared safetensors for a .pth)
MODEL_INPUTS = MODEL_PLAN.inputs


# A truncated or foreign artifact (a killed copy, a full disk, a hand edit) looks finished to
# Snakemake, which only sees that the file exists: move it, and what was made from it, aside.
# Last, so a run stopped by a bad sheet, config or model file leaves results untouched.
def only_looking(argv):
    """Whether this Snakemake call only looks (a dry run, --report, a listing): then nothing is moved.
    (Snakemake says so only after the Snakefile is read, so the command line tells.)"""
    looks = {"--dry-run", "--dryrun", "--report", "--summary", "--detailed-summary", "--lint", "--dag",
             "--rulegraph", "--filegraph", "--list-rules", "--list-target-rules", "--list-changes",
             "--list-code-changes", "--list-input-changes", "--list-params-changes", "--unlock"}
    short = [a for a in argv[1:] if a.startswith("-") and not a.startswith("--")]
    return any(a.split("=")[0] in looks for a in argv[1:]) or any("n" in a[1:] or "l" in a[1:] for a in short)


if workflow.is_main_process and not only_looking(sys.argv):
    for moved in sweep(artifacts_and_products()):
        logger.warning(f"Broken artifact: {moved}")
