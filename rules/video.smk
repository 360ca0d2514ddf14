# From the final latent to the mp4: VAE decode to lossless frames (one job per group of rows),
# then H.264 (one CPU job per row). The decode job already makes each row's mp4 but the last
# into the store while it decodes the next row, so those encode_video jobs only link it.


for group, ids in ROW_GROUPS.items():

    rule:
        name:
            f"decode_{group}"
        input:
            latents=[row_path(i, "latent.safetensors") for i in ids],
            vae=MODEL_INPUTS["vae"],
        output:
            [frames_output(i) for i in ids],
        params:
            rows=[
                {"key": i, "latent": row_path(i, "latent.safetensors"), "video": ROWS[i].video(),
                 "out": row_path(i, "frames")}
                for i in ids
            ],
            device=config["device"],
            vae_dtype=config["vae_dtype"],
            store=STORE,
            mp4={"fps": config["video"]["fps"], "quality": config["video"]["quality"]},
        log:
            log_path("decode", group),
        benchmark:
            benchmark_path("decode", group)
        retries: 1
        resources:
            **group_resources("decode", len(ids)),
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
        store=STORE,
    log:
        log_path("encode_video"),
    benchmark:
        benchmark_path("encode_video")
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/encode_video.py"
