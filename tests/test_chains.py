"""Chained rows: a row's last frame kept for the rows that start from it (`@<id>`), a chain's rows
joined into one video, and, end to end, a chained sheet's reruns."""

import re

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

from turbowan.files.artifacts import fingerprint, read_record
from turbowan.files.video import count_frames, save_frames
from turbowan.stages.video import join_chain, save_last_frame

from .conftest import REPO, file_ids, jobs_run, make_workdir, snakemake

H, W = 32, 48


def solid_frames(folder, levels):
    """A frames folder whose frame i is one flat grey of levels[i] (so a frame is told by its colour,
    through H.264 too)."""
    frames = torch.stack([torch.full((H, W, 3), level, dtype=torch.uint8) for level in levels])
    save_frames(frames, folder, {"made_by": "this test"})
    return str(folder)


def mp4_levels(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    next(reader)  # (its metadata)
    return [int(round(np.frombuffer(frame, np.uint8).mean())) for frame in reader]


def test_the_last_frame_is_kept_losslessly(tmp_path):
    frames = torch.randint(0, 256, (5, H, W, 3), dtype=torch.uint8)
    save_frames(frames, tmp_path / "frames", {"made_by": "this test"})
    save_last_frame(str(tmp_path / "frames"), str(tmp_path / "last_frame.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "last_frame.png")), frames[-1].numpy())


def test_a_chain_drops_the_repeated_frame_where_a_row_continues_the_one_before(tmp_path):
    a = solid_frames(tmp_path / "a", [20, 40, 60, 80, 100])
    b = solid_frames(tmp_path / "b", [250, 120, 140, 160, 180])  # 250: its first frame, a's last again
    c = solid_frames(tmp_path / "c", [200, 220, 230, 240, 210])  # a cut: c does not start from b
    join_chain([a, b, c], [False, True, False], str(tmp_path / "walk.mp4"), fps=16, quality=10)
    assert count_frames(tmp_path / "walk.mp4") == 5 + 4 + 5
    levels = mp4_levels(tmp_path / "walk.mp4")
    expected = [20, 40, 60, 80, 100, 120, 140, 160, 180, 200, 220, 230, 240, 210]
    assert all(abs(got - want) <= 3 for got, want in zip(levels, expected)), levels


def test_a_chain_of_rows_of_different_sizes_is_refused(tmp_path):
    a = solid_frames(tmp_path / "a", [20, 40])
    wide = torch.zeros(2, H, W + 16, 3, dtype=torch.uint8)
    save_frames(wide, tmp_path / "b", {"made_by": "this test"})
    with pytest.raises(Exception, match="frames of 64x32, but the chain's first row has 48x32"):
        join_chain([a, str(tmp_path / "b")], [False, True], str(tmp_path / "walk.mp4"), fps=16, quality=8)
    assert not (tmp_path / "walk.mp4").exists()


# ------------------------------------------------------------------ end to end

CHAINED = (
    "id,image,last_image,prompt,seed,num_frames,width,height,num_steps,chain\n"
    "A,images/harbour.png,,a boat leaves,1,5,48,32,2,walk\n"
    "B,@A,,the boat sails on,2,5,,,2,walk\n"
    "C,@B,images/cafe.png,and reaches a cafe,3,5,,,2,walk\n"
    "D,images/portrait.jpg,images/harbour.png,a face,4,5,32,48,2,\n"
)


@pytest.mark.slow
def test_a_chained_sheet_makes_its_chain_and_reruns_what_a_changed_seed_reaches(tmp_path):
    folder = make_workdir(tmp_path, CHAINED)
    snakemake(folder)
    results = folder / "results"
    assert count_frames(results / "chains" / "walk.mp4") == 3 * 5 - 2  # a repeated frame dropped per joint
    for row in "ABCD":
        assert count_frames(results / row / "video.mp4") == 5
    # B starts from A's last frame, C from B's; nothing keeps D's or C's
    assert sorted(p.parent.name for p in results.glob("*/last_frame.png")) == ["A", "B"]
    for row, source in (("B", "A"), ("C", "B")):
        recorded = read_record(results / row / "cond.safetensors")["inputs"]["image"]
        assert recorded["sha256"] == fingerprint(results / source / "last_frame.png")["sha256"]
    assert "last_image" in read_record(results / "D" / "cond.safetensors")["inputs"]
    before = file_ids(folder)

    sheet = folder / "sheet.csv"
    sheet.write_text(CHAINED.replace("a boat leaves,1,", "a boat leaves,11,"), encoding="utf-8")
    run = snakemake(folder)
    after = file_ids(folder)
    changed = {path for path in after if after[path] != before.get(path)}
    for row in "ABC":  # A's seed: A's sampling on, and every row after it in the chain from its image on
        stages = ["boundary", "latent", "video"] + (["cond"] if row != "A" else [])
        assert {f"results/{row}/{s}.{'mp4' if s == 'video' else 'safetensors'}" for s in stages} <= changed, changed
    assert "results/A/cond.safetensors" not in changed
    assert "results/chains/walk.mp4" in changed
    assert not {path for path in changed if path.startswith(("results/D/", "results/prompts/"))}, changed
    ran = jobs_run(run.stdout + run.stderr)
    assert {rule: ran.count(rule) for rule in ("sample_high", "encode_image", "join_chain")} == {
        "sample_high": 3, "encode_image": 2, "join_chain": 1}, ran
    assert "encode_prompt" not in ran

    # A remade chain video decodes its rows again (their frames are temporary): the same last frames in
    # new files, which rerun nothing after them (ancient() inputs; the latents stand for them)
    before = file_ids(folder)
    (results / "chains" / "walk.mp4").unlink()
    run = snakemake(folder)
    ran = jobs_run(run.stdout + run.stderr)
    assert sorted(set(ran) - {"all", "gallery", "batch_contact_sheet"}) == [
        "decode", "encode_video", "join_chain", "save_last_frame"], ran
    after = file_ids(folder)
    assert [path for path in after if after[path] != before.get(path) and path.endswith(".safetensors")] == []
    assert count_frames(results / "chains" / "walk.mp4") == 3 * 5 - 2


def test_on_a_cluster_rows_are_grouped_by_how_far_down_their_chain_they_are(tmp_path):
    """The slurm profile bundles a model stage's rows into group jobs; a row must not share one with
    the row it starts from (Snakemake refuses a group that waits on itself), so each depth is its own
    group, and the profile's group-components apply to every depth. A dry run plans it, no cluster."""
    folder = make_workdir(tmp_path, CHAINED)
    run = snakemake(folder, "--profile", str(REPO / "profiles" / "slurm"), "--dry-run")
    parts = re.split(r"Group job (\S+) \(jobs in lexicogr\. order\):", run.stdout)
    members = {}
    for name, body in zip(parts[1::2], parts[2::2]):  # a group's jobs are indented under it
        members.setdefault(name, []).append(sorted(re.findall(r"^ {8}wildcards: id=(\S+)$", body, re.M)))
    for stage in ("encode_image", "sample_high", "sample_low", "decode"):
        # A and D (they start from pictures) share one job; B (from A) and C (from B) each have their own
        assert members[stage] == [["A", "D"]] and members[f"{stage}.1"] == [["B"]] and members[f"{stage}.2"] == [["C"]], (
            stage, members)


def test_turbowan_check_finds_a_damaged_last_frame_and_chain_video(tmp_path):
    from turbowan.check import find_damage
    from turbowan.sheet import Row

    common = dict(prompt="p", seed=1, num_frames=5, width=W, height=H, num_steps=2, sigma_max=80.0, boundary=0.9,
                  ode=False, chain="walk")
    rows = [Row(id="A", image="a.png", **common), Row(id="B", image="@A", **common)]
    results = tmp_path / "results"
    a = solid_frames(tmp_path / "a", [20, 40, 60, 80, 100])
    b = solid_frames(tmp_path / "b", [100, 120, 140, 160, 180])
    (results / "A").mkdir(parents=True)
    save_last_frame(a, str(results / "A" / "last_frame.png"))
    join_chain([a, b], [False, True], str(results / "chains" / "walk.mp4"), fps=16, quality=8)
    assert find_damage(results, rows) == []  # 5 + 4 frames: what the sheet says the chain has
    (results / "A" / "last_frame.png").write_bytes((results / "A" / "last_frame.png").read_bytes()[:-20])
    join_chain([a, a], [False, False], str(results / "chains" / "walk.mp4"), fps=16, quality=8)  # one frame too many
    found = {str(damage.path.relative_to(results)): damage.problem for damage in find_damage(results, rows)}
    assert set(found) == {"A/last_frame.png", "chains/walk.mp4"}, found
    assert "not a complete PNG" in found["A/last_frame.png"] and "has 10 frames, expected 9" in found["chains/walk.mp4"]


@pytest.mark.slow
def test_chains_listed_one_after_another_run_part_by_part_across_chains(tmp_path):
    """Waves go by depth: both chains' first parts, then both second parts, ..., so one card keeps an
    expert for a wave's high-noise steps instead of swapping at every part of one chain."""
    import yaml

    sheet = "id,image,prompt,seed,num_frames,width,height,num_steps,chain\n" + "".join(
        f"{chain}{part},{'images/harbour.png' if part == 1 else f'@{chain}{part - 1}'},{chain} part {part},{part},5,32,32,2,{chain}\n"
        for chain in ("x", "y") for part in (1, 2, 3))
    folder = make_workdir(tmp_path, sheet)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["wave_rows"] = 2
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    run = snakemake(folder)
    sampling = [rule for rule in jobs_run(run.stdout + run.stderr) if rule.startswith("sample_")]
    assert sampling == ["sample_high", "sample_high", "sample_low", "sample_low"] * 3, sampling
    assert count_frames(folder / "results" / "chains" / "x.mp4") == count_frames(folder / "results" / "chains" / "y.mp4") == 13
