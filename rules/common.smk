# The sheet, paths and input functions shared by every rule.
import os
import sys

from snakemake.exceptions import WorkflowError

# The `turbowan` library of this checkout, importable without installing it. (Scripts find it
# through the scripts/turbowan link: Snakemake puts a script's folder on its sys.path.)
sys.path.insert(0, workflow.basedir)

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


def all_videos():
    return expand(f"{RESULTS}/{{id}}/video.mp4", id=ROWS)


# The demo models are made by rule make_demo_models; any other model file must exist already.
DEMO_MODELS = {
    "high": "resources/demo-models/high_noise.safetensors",
    "low": "resources/demo-models/low_noise.safetensors",
    "vae": "resources/demo-models/Wan2.1_VAE.safetensors",
    "text_encoder": "resources/demo-models/umt5-encoder.safetensors",
    "tokenizer": "resources/demo-models/umt5-tokenizer",
}
_missing_models = [
    f"models.{key}: {MODELS[key]} does not exist"
    for key in DEMO_MODELS
    if MODELS[key] != DEMO_MODELS[key] and not os.path.exists(MODELS[key])
]
if _missing_models:
    raise WorkflowError("model files not found (check the config's `models`):\n  " + "\n  ".join(_missing_models))
