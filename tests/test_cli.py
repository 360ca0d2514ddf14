"""The `turbowan` command: status (the summary table) and inspect (an artifact's header)."""

import pickle
import subprocess
import sys

import torch
import yaml

from tests.conftest import REPO, write_image
from turbowan.files.artifacts import save_artifact
from turbowan.cli import main
from turbowan.report.summary import STAGES, RowRef, stage_output, write_summary

ROWS = [RowRef("boat", "a boat", "0123456789abcdef"), RowRef("cafe", "a café", "fedcba9876543210")]


def test_inspect_prints_tensors_and_record(tmp_path, capsys):
    upstream = tmp_path / "cond.safetensors"
    upstream.write_bytes(b"upstream bytes")
    path = tmp_path / "boundary.safetensors"
    save_artifact(
        path,
        {"x": torch.zeros(1, 16, 3, 4, 6, dtype=torch.float64), "next_step": torch.tensor([2])},
        stage="sample_high", params={"seed": 42, "boundary": 0.9, "ode": False}, inputs={"cond": upstream},
    )
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "tensors (2):"
    assert out[2].split() == ["next_step", "[1]", "I64"]
    assert out[3].split() == ["x", "[1,", "16,", "3,", "4,", "6]", "F64"]
    assert "stage: sample_high" in out
    assert "  boundary = 0.9" in out and "  seed = 42" in out and "  ode = False" in out
    assert any(line.startswith(f"  cond: {upstream} (14 bytes, ") for line in out)
    assert any(line.startswith("versions: ") and "torch " in line for line in out)


def test_inspect_never_unpickles(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "model.pth"
    evil.write_bytes(pickle.dumps(Payload()))
    torch_zip = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2)}, torch_zip)
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")

    assert main(["inspect", str(evil), str(torch_zip), str(garbage)]) == 1
    err = capsys.readouterr().err
    assert not marker.exists()
    assert err.count("never unpickles") == 2 and "broken.safetensors: not a readable safetensors file" in err


def test_inspect_a_checkpoint_without_record(tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "vae.safetensors"
    save_file({"conv1.weight": torch.zeros(4, 3, dtype=torch.bfloat16)}, str(path), metadata={"format": "pt"})
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "conv1.weight  [4, 3]" in out and "BF16" in out
    assert "no 'turbowan' record" in out and '"format": "pt"' in out


def test_status_rebuilds_from_the_previous_summary(tmp_path, capsys):
    for stage in STAGES:
        out = stage_output(tmp_path, ROWS[0], stage)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.mkdir() if stage == "decode" else out.write_bytes(b"x")
    write_summary(tmp_path, ROWS)
    stage_output(tmp_path, ROWS[0], "encode_video").unlink()  # changed since the last run

    assert main(["status", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["boat", "missing", "ok", "ok", "ok", "ok", "ok", "-"]
    assert lines[2].split()[:3] == ["cafe", "missing", "-"]
    assert lines[-1] == "2 rows: 0 done, 0 failed, 2 incomplete"
    assert "boat,missing" in (tmp_path / "summary.csv").read_text()  # rebuilt on disk too


def test_status_without_a_summary(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "summary.csv does not exist yet" in capsys.readouterr().err


def test_status_from_a_config_as_a_command(tmp_path):
    """The installed entry point, reading the rows from a config's sheet (no run yet)."""
    write_image(tmp_path / "a.png", 32, 32)
    (tmp_path / "sheet.csv").write_text('id,image,prompt\nrow-1,a.png,"one, two"\nrow-2,a.png,three\n')
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(sheet="sheet.csv", results="out")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "turbowan.cli", "status", "--configfile", "config.yaml"],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[:2] for line in proc.stdout.splitlines()[1:3]] == [["row-1", "missing"], ["row-2", "missing"]]
    assert (tmp_path / "out" / "summary.csv").is_file()


def test_status_with_a_minimal_configfile_merges_it_over_the_defaults(tmp_path, capsys, monkeypatch):
    """A my.yaml with only `sheet` and `results` (Snakemake merges it over config/config.yaml) works for
    `turbowan status` and `turbowan check` too: the defaults come from the workflow's config."""
    write_image(tmp_path / "a.png", 40, 30)
    (tmp_path / "sheet.csv").write_text("id,image,prompt\nrow1,a.png,a boat\n", encoding="utf-8")
    (tmp_path / "my.yaml").write_text(yaml.safe_dump({"sheet": "sheet.csv", "results": "out"}))
    monkeypatch.chdir(tmp_path)
    assert main(["status", "--configfile", "my.yaml"]) == 0
    assert "row1" in capsys.readouterr().out and (tmp_path / "out" / "summary.csv").is_file()
    assert main(["check", "--configfile", "my.yaml"]) == 0
    assert "no damaged artifact among 1 rows" in capsys.readouterr().out


def test_status_and_check_name_every_config_and_sheet_problem_without_a_traceback(tmp_path, capsys, monkeypatch):
    write_image(tmp_path / "a.png", 40, 30)
    (tmp_path / "sheet.csv").write_text("id,image,prompt\nrow1,a.png,a boat\nrow2,b.png,x\n", encoding="utf-8")
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(
        {"sheet": "sheet.csv", "results": "out", "wave_row": 2, "defaults": {"num_steps": 9}}))
    monkeypatch.chdir(tmp_path)
    for command in ("status", "check"):
        assert main([command, "--configfile", "my.yaml"]) == 2
        err = capsys.readouterr().err
        assert err.splitlines() == [f"turbowan {command}: config: 2 problem(s); nothing was run:",
                                    "  - wave_row: unknown key (did you mean 'wave_rows'?)",
                                    "  - defaults.num_steps: 9 is greater than the maximum of 4"]
    assert not (tmp_path / "out").exists()

    (tmp_path / "my.yaml").write_text(yaml.safe_dump({"sheet": "sheet.csv", "results": "out"}))
    assert main(["status", "--configfile", "my.yaml"]) == 2
    err = capsys.readouterr().err
    assert "turbowan status: sheet.csv: 1 problem(s) in the sheet" in err and "Traceback" not in err
    assert "row 2 (line 3, id 'row2'), column 'image': 'b.png' does not exist" in err
    (tmp_path / "my.yaml").write_text("sheet: [")
    assert main(["status", "--configfile", "my.yaml"]) == 2
    assert "my.yaml: not valid YAML" in capsys.readouterr().err
