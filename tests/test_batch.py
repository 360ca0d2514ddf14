"""Group jobs without Snakemake: the store, reuse, failure records, garbage collection."""

import pytest
import torch

from turbowan.files.artifacts import failure_record, load_artifact, save_artifact
from turbowan.batch import RowFailed, RowTask, collect_garbage, run_rows, store_key


def upstream(folder, name, value):
    path = folder / f"{name}.safetensors"
    save_artifact(path, {"x": torch.tensor([float(value)])}, stage="up", params={"v": value})
    return str(path)


def tasks_for(folder, values):
    return [RowTask(f"r{i}", str(folder / f"r{i}" / "out.safetensors"), {"scale": 2},
                    {"up": upstream(folder, f"up{i}", v)}) for i, v in enumerate(values)]


def doubling(calls, fail=()):
    def compute(task, path):
        calls.append(task.key)
        if task.key in fail:
            raise ValueError(f"cannot do {task.key}")
        x, _ = load_artifact(task.inputs["up"], "up", {"x": ((1,), torch.float32)})
        save_artifact(path, {"y": x["x"] * task.params["scale"]}, stage="double", params=task.params,
                      inputs=task.inputs)
    return compute


def test_a_rerun_computes_only_rows_whose_inputs_changed(tmp_path):
    store, calls = tmp_path / "store", []
    tasks = tasks_for(tmp_path, [1, 2, 3])
    assert run_rows("double", tasks, doubling(calls), store) == {"r0": "computed", "r1": "computed", "r2": "computed"}
    first = {t.key: (tmp_path / t.key / "out.safetensors").stat().st_ino for t in tasks}
    for t in tasks:  # Snakemake deletes a job's outputs before it runs the job again
        (tmp_path / t.key / "out.safetensors").unlink()
    tasks = tasks_for(tmp_path, [1, 5, 3])  # r1's upstream changed
    calls.clear()
    assert run_rows("double", tasks, doubling(calls), store) == {"r0": "reused", "r1": "computed", "r2": "reused"}
    assert calls == ["r1"]
    out = {t.key: tmp_path / t.key / "out.safetensors" for t in tasks}
    assert out["r0"].stat().st_ino == first["r0"] and out["r1"].stat().st_ino != first["r1"]
    y, _ = load_artifact(out["r1"], "double", {"y": ((1,), torch.float32)})
    assert y["y"].item() == 10.0


def test_the_key_follows_parameters_and_input_contents_not_mtimes(tmp_path):
    path = upstream(tmp_path, "a", 1)
    key = store_key("double", {"scale": 2}, {"up": path})
    assert store_key("double", {"scale": 3}, {"up": path}) != key
    upstream(tmp_path, "a", 1)  # rewritten, same bytes
    assert store_key("double", {"scale": 2}, {"up": path}) == key
    upstream(tmp_path, "a", 4)
    assert store_key("double", {"scale": 2}, {"up": path}) != key


def test_one_failing_row_leaves_a_record_and_the_others_their_results(tmp_path):
    calls = []
    outcome = run_rows("double", tasks_for(tmp_path, [1, 2, 3]), doubling(calls, fail={"r1"}), tmp_path / "store")
    assert outcome == {"r0": "computed", "r1": "failed", "r2": "computed"}
    record = failure_record(tmp_path / "r1" / "out.safetensors")
    assert record == {"stage": "failed", "failed_stage": "double", "row": "r1", "error": "ValueError: cannot do r1"}
    with pytest.raises(Exception, match="row r1 failed in double: ValueError: cannot do r1"):
        load_artifact(tmp_path / "r1" / "out.safetensors", "double", {"y": ((1,), torch.float32)})
    # the next stage passes the record on instead of computing
    later = [RowTask("r1", str(tmp_path / "r1" / "later.safetensors"), {}, {"y": str(tmp_path / "r1" / "out.safetensors")})]
    assert run_rows("later", later, doubling([]), tmp_path / "store") == {"r1": "upstream failed"}
    assert failure_record(tmp_path / "r1" / "later.safetensors")["failed_stage"] == "double"


def test_when_every_row_fails_the_job_fails_and_leaves_no_record(tmp_path):
    with pytest.raises(RowFailed, match="every row failed: r0: ValueError"):
        run_rows("double", tasks_for(tmp_path, [1]), doubling([], fail={"r0"}), tmp_path / "store")
    assert not (tmp_path / "r0" / "out.safetensors").exists()


def test_a_damaged_stored_result_is_computed_again(tmp_path):
    store, calls = tmp_path / "store", []
    tasks = tasks_for(tmp_path, [1])
    run_rows("double", tasks, doubling(calls), store)
    out = tmp_path / "r0" / "out.safetensors"
    data = bytearray(out.read_bytes())
    data[-2] ^= 0xFF  # flipped through the output's link: the store's file is the same file
    out.write_bytes(bytes(data))
    out.unlink()
    assert run_rows("double", tasks, doubling(calls), store) == {"r0": "computed"}
    assert calls == ["r0", "r0"]
    load_artifact(out, "double", {"y": ((1,), torch.float32)})  # digest checks out


def test_garbage_collection_keeps_only_what_an_output_links_to(tmp_path):
    store = tmp_path / "store"
    tasks = tasks_for(tmp_path, [1, 2])
    run_rows("double", tasks, doubling([]), store)
    (tmp_path / "r1" / "out.safetensors").unlink()  # say, a row removed from the sheet
    removed, freed = collect_garbage(store)
    assert removed == 1 and freed > 0
    assert [p.stat().st_nlink for p in (store / "double").iterdir()] == [2]


def test_lookahead_works_on_the_next_needed_row_while_the_caller_finishes_this_one(tmp_path):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from turbowan.batch import Lookahead

    tasks = [RowTask(f"r{i}", str(tmp_path / f"r{i}"), {}, {}) for i in range(4)]
    started, release = [], {t.key: threading.Event() for t in tasks}

    def work(task):
        started.append(task.key)
        if task.key == "r3":
            raise ValueError("r3 cannot be done")
        release[task.key].wait(10)
        return task.key.upper()

    with ThreadPoolExecutor(1) as pool:
        ahead = Lookahead(pool, work, tasks, needed=lambda t: t.key != "r1")  # r1: already in the store
        release["r0"].set()
        assert ahead.result(tasks[0]) == "R0"
        for _ in range(500):  # r2 runs without being asked for (r1 is skipped), while the caller goes on
            if started == ["r0", "r2"]:
                break
            threading.Event().wait(0.01)
        assert started == ["r0", "r2"]
        release["r2"].set()
        assert ahead.result(tasks[2]) == "R2"
        with pytest.raises(ValueError, match="r3 cannot be done"):  # r3's own error, raised for r3
            ahead.result(tasks[3])
    assert started == ["r0", "r2", "r3"]
