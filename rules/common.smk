# The sheet, paths and input functions shared by every rule.
import os
import sys

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

# The `turbowan` library of this checkout, importable without installing it. (Scripts find it
# through the scripts/turbowan link: Snakemake puts a script's folder on its sys.path.)
sys.path.insert(0, workflow.basedir)

from turbowan.artifacts import sweep  # noqa: E402
from turbowan.formats import CheckpointError  # noqa: E402
from turbowan.modelfiles import plan_models  # noqa: E402
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


def benchmark_path(rule_name, key="{id}"):
    return f"{RESULTS}/benchmarks/{rule_name}/{key}.tsv"


def frugal_level(wildcards, attempt):
    """0 on the first attempt; a retried job (say, after running out of GPU memory) saves memory."""
    return attempt - 1


def text_for_row(wildcards):
    return f"{RESULTS}/prompts/{ROWS[wildcards.id].prompt_key}/text.safetensors"


def video_params(wildcards):
    return ROWS[wildcards.id].video()


def sampling_params(wildcards):
    return ROWS[wildcards.id].sampling()


def frames_output():
    """Decoded frames are temporary unless the config keeps them."""
    frames = directory(row_dir("frames"))
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
if workflow.is_main_process:
    for moved in sweep(artifacts_and_products()):
        logger.warning(f"Broken artifact: {moved}")
