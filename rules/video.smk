# From the final latent to the mp4: VAE decode to lossless frames, then H.264.


rule decode:
    input:
        latent=row_dir("latent.safetensors"),
        vae=MODEL_INPUTS["vae"],
    output:
        frames=frames_output(),
    params:
        video=video_params,
        device=config["device"],
        vae_dtype=config["vae_dtype"],
    log:
        log_path("decode"),
    benchmark:
        benchmark_path("decode")
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
        frames=row_dir("frames"),
    output:
        row_dir("video.mp4"),
    params:
        video=video_params,
        fps=config["video"]["fps"],
        quality=config["video"]["quality"],
    log:
        log_path("encode_video"),
    benchmark:
        benchmark_path("encode_video")
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/encode_video.py"
