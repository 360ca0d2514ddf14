# From the final latent to the mp4: VAE decode to lossless frames (GPU), then H.264 (CPU).


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
        video=lambda wildcards: row_of(wildcards).video(),
        device=config["device"],
        vae_dtype=config["vae_dtype"],
    log:
        LAYOUT.log("decode", "{id}"),
    benchmark:
        LAYOUT.benchmark("decode", "{id}")
    priority: wave_priority("decode")
    retries: 1
    resources:
        gpu=1,
        frugal=frugal_level,
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/decode.py"


rule encode_video:
    input:
        frames=LAYOUT.frames("{id}"),
    output:
        LAYOUT.video("{id}"),
    params:
        video=lambda wildcards: row_of(wildcards).video(),
        fps=config["video"]["fps"],
        quality=config["video"]["quality"],
    log:
        LAYOUT.log("encode_video", "{id}"),
    benchmark:
        LAYOUT.benchmark("encode_video", "{id}")
    priority: wave_priority("encode_video")
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/encode_video.py"
