# From the final latent to the mp4: VAE decode to lossless frames (GPU), then H.264 and pictures (CPU).


def frames_output():
    """Decoded frames are temporary unless the config keeps them."""
    frames = directory(LAYOUT.frames("{id}"))
    return frames if config["keep_frames"] else temp(frames)


rule decode:
    input:
        latent=LAYOUT.latent("{id}"),
        vae=MODEL_INPUTS["vae"],
    output:
        frames_output(),
    params:
        video=row_video,
        device=config["device"],
        vae_dtype=config["vae_dtype"],
    log:
        LAYOUT.log("decode", "{id}"),
    benchmark:
        LAYOUT.benchmark("decode", "{id}")
    priority: wave_priority("decode")
    group: model_group("decode")
    retries: 1
    resources:
        gpu=1,
        frugal=frugal_level,
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/decode.py"


# The mp4, then its pictures (a contact sheet and an animated preview, made from the mp4 in the same
# job: a job's start costs more than they do). The caption's prompt is read from the sheet by key.
rule encode_video:
    input:
        frames=LAYOUT.frames("{id}"),
        sheet=ancient(config["sheet"]),
    output:
        video=LAYOUT.video("{id}"),
        contact_sheet=LAYOUT.contact_sheet("{id}"),
        animation=LAYOUT.preview("{id}"),
    params:
        video=row_video,
        fps=config["video"]["fps"],
        quality=config["video"]["quality"],
        prompt_key=row_prompt_key,
    log:
        LAYOUT.log("encode_video", "{id}"),
    benchmark:
        LAYOUT.benchmark("encode_video", "{id}")
    priority: wave_priority("encode_video")
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/encode_video.py"


# A row's last frame as a PNG of its own, for the rows that start or end on it (`@<id>`): the frames
# folder is temporary, and a row chained in a later run must not need the row before decoded again.
rule save_last_frame:
    input:
        frames=LAYOUT.frames("{id}"),
    output:
        LAYOUT.last_frame("{id}"),
    log:
        LAYOUT.log("save_last_frame", "{id}"),
    priority: wave_priority("save_last_frame")
    localrule: True
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/save_last_frame.py"


# A chain's rows joined into one video, from their lossless frames, dropping the repeated frame at
# each joint where a row starts from the previous one's last frame.
rule join_chain:
    input:
        frames=chain_frames,
    output:
        LAYOUT.chain("{chain}"),
    params:
        continues=chain_continues,
        fps=config["video"]["fps"],
        quality=config["video"]["quality"],
    log:
        LAYOUT.log("join_chain", "{chain}"),
    benchmark:
        LAYOUT.benchmark("join_chain", "{chain}")
    priority: wave_priority("join_chain")
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/join_chain.py"
