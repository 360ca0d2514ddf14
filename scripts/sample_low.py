from turbowan.runtime.jobs import model_job

# turbowan/stages/__init__.py names the module of each stage
model_job(snakemake, "sample_low")
