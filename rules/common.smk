# The sheet, the results layout, input functions and job priorities shared by every rule.
# Reading this file changes nothing on disk: it checks the sheet and the model files, and plans.
import inspect
import sys

from snakemake.common import overwrite_function_params
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

# The `turbowan` library of this checkout, importable without installing it. (Scripts find it
# through the scripts/turbowan link: Snakemake puts a script's folder on its sys.path.)
sys.path.insert(0, workflow.basedir)

from turbowan.files.formats import CheckpointError  # noqa: E402
from turbowan.files.modelfiles import plan_models  # noqa: E402
from turbowan.layout import Layout, row_reference  # noqa: E402
from turbowan.loras import grouped_positions, plan_loras  # noqa: E402
from turbowan.sheet import (  # noqa: E402
    SheetError, chain_depths, chains, continues, load_schema, long_prompt_warnings, prompt_token_counts, read_rows,
)

LAYOUT = Layout(config["results"])

try:
    ROWS = {
        row.id: row
        for row in read_rows(
            config["sheet"],
            config["defaults"],
            load_schema(f"{workflow.basedir}/config/schemas/sheet.schema.yaml"),
            decode_images=workflow.is_main_process,
        )
    }
except SheetError as err:
    raise WorkflowError(str(err)) from None
PROMPTS = {row.prompt_key: row.prompt for row in ROWS.values()}


wildcard_constraints:
    id="[A-Za-z0-9_-][A-Za-z0-9._-]*",
    prompt_key="[0-9a-f]{16}",
    chain="[A-Za-z0-9_-][A-Za-z0-9._-]*",


# A row's depth: 0 when it starts from pictures, else one more than the deepest row it starts or ends
# on (`@<id>`). Rows of one depth never wait for each other: the waves and the cluster groups use it.
DEPTH = chain_depths(ROWS.values())


# Waves: the sheet's rows, `wave_rows` at a time. Every job of a wave outranks every job of the
# next; within a wave the stages run in order, and within a stage the rows in sheet order. So one
# GPU runs a wave's text and image encodings, then all its high-noise steps (one expert loaded),
# then all its low-noise steps, then its decodes and mp4s, before the next wave starts: few model
# loads, and videos as the batch goes. Rows that start from other rows come after all the rows of
# lesser depth: a sheet of chains listed one after another runs every chain's first part, then
# every second part, ..., rather than part after part of one chain, an expert swap at each.
WAVE_ROWS = config["wave_rows"]
ORDER = sorted(ROWS, key=lambda row_id: DEPTH[row_id])  # (a stable sort: sheet order within a depth)
POSITION = {row_id: number for number, row_id in enumerate(ORDER)}
PROMPT_POSITION = {}
for _row in ROWS.values():
    PROMPT_POSITION.setdefault(_row.prompt_key, POSITION[_row.id])
STAGE_RANK = {"encode_prompt": 5, "encode_image": 4, "sample_high": 3, "sample_low": 2, "decode": 1,
              "save_last_frame": 1, "encode_video": 0, "join_chain": 0}
RANKS = max(STAGE_RANK.values()) + 1
WAVES = len(ROWS) // WAVE_ROWS + 1

# Chains: rows with one `chain` name, in sheet order, joined into one video (rule join_chain), in the
# wave of its deepest row.
CHAINS = chains(ROWS.values())  # name -> its rows, in sheet order
CHAIN_POSITION = {name: max(POSITION[row.id] for row in members) for name, members in CHAINS.items()}


# Cluster profiles bundle the rows of a model stage into group jobs (`group-components` in
# profiles/slurm). A group job that held a row and a row that starts from it would wait on itself
# (Snakemake refuses such a DAG), so each depth is a group of its own: `sample_high`, then
# `sample_high.1`, ... Snakemake looks `group-components` up under the name a group was declared with
# (its `parent_groupids`, which it fills itself for group names with wildcards); the depths' groups
# are declared here as the stage's, so the profile's counts apply to every depth. (Snakemake uses
# groups on clusters only; a local dry run shows them.)
def model_group(stage):
    """A model rule's `group:`, per row: its stage, and its depth when it starts from another row."""
    for depth in set(DEPTH.values()) - {0}:
        workflow.parent_groupids[f"{stage}.{depth}"] = stage
    return of_wildcards(lambda wildcards: stage if DEPTH[wildcards.id] == 0 else f"{stage}.{DEPTH[wildcards.id]}")


def of_wildcards(function):
    """Give an input, params, resources or priority function its signature once, so that Snakemake
    need not inspect it again for each of a big sheet's thousands of jobs, as Snakemake's own helpers
    (snakemake.ioutils) do. (A profile showed the inspection in planning; the saving was within the
    VM's noise.)"""
    overwrite_function_params(function, inspect.signature(function).parameters)
    return function


def wave_priority(stage):
    """The `priority:` of a per-row (or per-prompt) rule: its wave, then its stage, then its row."""
    rank = STAGE_RANK[stage]

    def priority(wildcards):
        keys = wildcards.keys()
        if "prompt_key" in keys:
            position = PROMPT_POSITION[wildcards.prompt_key]
        elif "chain" in keys:
            position = CHAIN_POSITION[wildcards.chain]
        else:
            position = STAGE_POSITION.get(stage, POSITION)[wildcards.id]  # (STAGE_POSITION: LoRAs, below)
        wave, in_wave = divmod(position, WAVE_ROWS)
        return ((WAVES - wave) * RANKS + rank) * WAVE_ROWS + (WAVE_ROWS - in_wave)

    return of_wildcards(priority)


@of_wildcards
def row_images(wildcards):
    """encode_image's pictures: `image`, and `last_image` when the row has one. A cell `@<id>` is that
    row's last frame (rule save_last_frame), so the row waits for it; see row_sources."""
    row = ROWS[wildcards.id]
    cells = {"image": row.image, "last_image": row.last_image}
    return {column: ancient(LAYOUT.image(cell)) if row_reference(cell) else LAYOUT.image(cell)
            for column, cell in cells.items() if cell is not None}


@of_wildcards
def row_sources(wildcards):
    """The final latents of the rows this row starts or ends on. A last frame is made again from
    temporary frames whenever they are decoded again (an mp4 or a chain video remade), the same
    picture in a new file: so the frame is an ancient() input, which reruns nothing by its date, and
    the latent it comes from is the input that reruns this row when that row's result changes."""
    return [LAYOUT.latent(ref) for ref in dict.fromkeys(ROWS[wildcards.id].references().values())]


@of_wildcards
def chain_frames(wildcards):
    return [LAYOUT.frames(row.id) for row in CHAINS[wildcards.chain]]


@of_wildcards
def chain_continues(wildcards):
    return continues(CHAINS[wildcards.chain])


@of_wildcards
def row_video(wildcards):
    return ROWS[wildcards.id].video()


@of_wildcards
def row_sampling(wildcards):
    return ROWS[wildcards.id].sampling()


@of_wildcards
def row_text(wildcards):
    return LAYOUT.text(ROWS[wildcards.id].prompt_key)


@of_wildcards
def row_prompt_key(wildcards):
    return ROWS[wildcards.id].prompt_key


def wildcard(name):
    """A params function giving a wildcard's value (a key or an id: never free text)."""
    return of_wildcards(lambda wildcards: wildcards[name])


def frugal_level(wildcards, attempt):
    """0 on the first attempt; a retried job (say, after running out of GPU memory) saves memory."""
    return attempt - 1


of_wildcards(frugal_level)


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
    MODEL_PLAN = plan_models(config["models"], PREPARED, DEMO_MODELS, config["download"],
                             check=workflow.is_main_process)
except CheckpointError as err:
    raise WorkflowError(str(err)) from None
if MODEL_PLAN.problems:
    raise WorkflowError("model files (check the config's `models`):\n  " + "\n  ".join(MODEL_PLAN.problems))
# role -> the file the stages read (the prepared safetensors for a .pth)
MODEL_INPUTS = MODEL_PLAN.inputs

# umT5 reads at most 512 tokens: say which rows' prompts are longer before any job runs (once the
# tokenizer is there; the demo's is made by a rule).
if workflow.is_main_process:
    for _warning in long_prompt_warnings(ROWS.values(), prompt_token_counts(PROMPTS, MODEL_INPUTS["tokenizer"])):
        logger.warning(_warning)


# LoRAs: the config's `loras` (name -> a file per expert), picked per row by the sheet's `loras`
# column (turbowan/loras.py). Each row's set per expert is planned now, and every name and every file
# a row uses is checked now: a LoRA that does not fit its expert stops the run, naming the file and
# its first tensor that does not fit. In each wave the sampling stages take the rows of one set one
# after another (a worker keeps one merge of an expert at a time); without LoRAs, sheet order.
DEMO_LORAS = {
    "high": "resources/demo-models/demo_lora_high.safetensors",
    "low": "resources/demo-models/demo_lora_low.safetensors",
}
LORA_PLAN = plan_loras(config.get("loras"), ROWS.values(), config["sheet"],
                       {role: [MODEL_INPUTS[role], config["models"][role]] for role in ("high", "low")},
                       DEMO_LORAS.values(), check=workflow.is_main_process)
if LORA_PLAN.problems:
    raise WorkflowError("LoRAs (the config's `loras`, the sheet's `loras` column); nothing was run:\n  "
                        + "\n  ".join(LORA_PLAN.problems))
STAGE_POSITION = {
    f"sample_{expert}": grouped_positions(ORDER, lambda row_id, e=expert: LORA_PLAN.key(row_id, e), WAVE_ROWS)
    for expert in ("high", "low")
}
