"""Sheet reading and validation: every problem reported at once, by row, id and column."""

from pathlib import Path

import pytest
import yaml

from turbowan.sheet import (COLUMNS, SheetError, check_defaults, load_schema, long_prompt_warnings, prompt_token_counts,
                            read_rows)

from .conftest import REPO, write_image

SCHEMA = load_schema(REPO / "config" / "schemas" / "sheet.schema.yaml")
DEFAULTS = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["defaults"]


@pytest.fixture
def sheet_dir(tmp_path):
    (tmp_path / "img").mkdir()
    write_image(tmp_path / "img" / "a.png", 64, 48)
    write_image(tmp_path / "img" / "wide.png", 1920, 1080)
    return tmp_path


def read(folder: Path, text: str, defaults=DEFAULTS, encoding="utf-8"):
    path = folder / "sheet.csv"
    path.write_text(text, encoding=encoding)
    return read_rows(path, defaults, SCHEMA)


def problems(folder: Path, text: str) -> list[str]:
    with pytest.raises(SheetError) as err:
        read(folder, text)
    assert "nothing was run" in str(err.value)
    return err.value.problems


def test_good_sheet_with_defaults_bom_and_awkward_prompts(sheet_dir):
    text = (
        'id,image,prompt,seed,num_frames,resolution,adaptive,ode\n'
        'a,img/a.png,"a cat, a dog, and ""quotes""",3,,480p,,\n'
        'b.2,img/wide.png,"line one\nline two — ünïcode 夜",,17,,true,yes\n'
    )
    rows = read(sheet_dir, text, encoding="utf-8-sig")
    a, b = rows
    assert a.id == "a" and a.prompt == 'a cat, a dog, and "quotes"' and a.seed == 3
    assert (a.width, a.height, a.num_frames) == (832, 480, 81)  # 480p 16:9 preset, default frames
    assert a.image == str((sheet_dir / "img" / "a.png").resolve())
    assert b.prompt == "line one\nline two — ünïcode 夜" and b.seed == DEFAULTS["seed"]
    assert (b.width, b.height, b.num_frames, b.ode) == (1280, 720, 17, True)  # adaptive at 720p
    assert a.prompt_key != b.prompt_key and len(a.prompt_key) == 16


BAD_ROWS = [
    ("bad/id,img/a.png,x", "id", "may only use letters"),
    (",img/a.png,x", "id", "is empty"),
    ("r,img/missing.png,x", "image", "does not exist"),
    ("r,img/broken.png,x", "image", "cannot be read as an image"),
    ("r,,x", "image", "is empty"),
    ("r,img/a.png,", "prompt", "is empty"),
    ("r,img/a.png,   ", "prompt", "is empty"),
    ("r,img/a.png,x,,80", "num_frames", "80 is not 4k+1"),
    ("r,img/a.png,x,,,1080p", "resolution", "'1080p' is not one of 480p, 720p"),
    ("r,img/a.png,x,,,,21:9", "aspect_ratio", "'21:9' is not one of"),
    ("r,img/a.png,x,,,,,,64", "height", "given together"),
    ("r,img/a.png,x,,,,,,65,64", "width", "multiple of 16"),
    ("r,img/a.png,x,,,,,,4096,64", "width", "<= 2048"),
    ("r,img/a.png,x,,,,,,,,5", "num_steps", "<= 4"),
    ("r,img/a.png,x,,,,,,,,0", "num_steps", ">= 1"),
    ("r,img/a.png,x,,,,,,,,,0", "sigma_max", "> 0"),
    ("r,img/a.png,x,,,,,,,,,,1.0", "boundary", "< 1"),
    ("r,img/a.png,x,,,,,,,,,,0", "boundary", "> 0"),
    ("r,img/a.png,x,abc", "seed", "'abc' is not a whole number"),
    ("r,img/a.png,x,1.5", "seed", "not a whole number"),
    ("r,img/a.png,x,-1", "seed", ">= 0"),
    ("r,img/a.png,x,,,,,maybe", "adaptive", "not true/false"),
    ("r,img/a.png,x,,,,,,,,,,,2", "ode", "not true/false"),
    ("logs,img/a.png,x", "id", "name of one of the batch's own files or folders"),
    ("gallery,img/a.png,x", "id", "name of one of the batch's own files or folders"),
    ("summary.csv,img/a.png,x", "id", "name of one of the batch's own files or folders"),
    ("..,img/a.png,x", "id", "starts with a dot"),
    (".,img/a.png,x", "id", "starts with a dot"),
    (".store,img/a.png,x", "id", "starts with a dot"),
]
HEADER = "id,image,prompt,seed,num_frames,resolution,aspect_ratio,adaptive,width,height,num_steps,sigma_max,boundary,ode\n"


@pytest.mark.parametrize("line, column, message", BAD_ROWS, ids=[f"{c}:{m}" for _, c, m in BAD_ROWS])
def test_each_bad_cell_is_named(sheet_dir, line, column, message):
    (sheet_dir / "img" / "broken.png").write_bytes(b"\x89PNG garbage")
    found = problems(sheet_dir, HEADER + "ok,img/a.png,fine\n" + line + "\n")
    assert len(found) == 1, found
    assert f"row 2" in found[0] and f"column '{column}'" in found[0] and message in found[0], found[0]


def test_every_problem_is_reported_at_once(sheet_dir):
    found = problems(sheet_dir, HEADER + "a,img/a.png,x\na,img/a.png,y\nb,img/nope.png,\nc,img/a.png,z,,10\n")
    assert len(found) == 4
    assert "row 2 (line 3, id 'a'), column 'id': duplicate id; row 1 (line 2) has it already" in found[0]
    assert any("row 3 (line 4, id 'b'), column 'image'" in p for p in found)
    assert any("row 3 (line 4, id 'b'), column 'prompt'" in p for p in found)
    assert any("row 4 (line 5, id 'c'), column 'num_frames'" in p for p in found)


def test_csv_lines_are_named_across_multi_line_prompts_and_blank_lines(sheet_dir):
    found = problems(sheet_dir, 'id,image,prompt\na,img/a.png,"two\nlines"\n\nb,img/a.png,x\nc,img/nope.png,y\n')
    assert any("row 3 (line 6, id 'c'), column 'image'" in p for p in found), found


def test_an_unknown_column_hides_no_rows_problem(sheet_dir):
    found = problems(sheet_dir, "id,image,prompt,sede\na,img/a.png,x,1\nb,img/nope.png,y,2\n")
    assert any("unknown column(s) 'sede'" in p for p in found)
    assert any("row 2 (line 3, id 'b'), column 'image'" in p for p in found), found


def test_unknown_and_missing_columns(sheet_dir):
    found = problems(sheet_dir, "id,image,sede\na,img/a.png,1\n")
    assert any("unknown column(s) 'sede'" in p for p in found)
    assert any("missing required column(s): prompt" in p for p in found)


def test_a_missing_column_hides_no_rows_problem_and_is_named_once(sheet_dir):
    found = problems(sheet_dir, "id,image,sede\na,img/a.png,1\nb,img/nope.png,2\na,img/a.png,3\n")
    assert found[:2] == ["unknown column(s) 'sede'; known columns: " + ", ".join(COLUMNS),
                         "missing required column(s): prompt"]
    assert found[2:] == ["row 2 (line 3, id 'b'), column 'image': 'img/nope.png' does not exist "
                         f"(looked for {sheet_dir / 'img' / 'nope.png'})",
                         "row 3 (line 4, id 'a'), column 'id': duplicate id; row 1 (line 2) has it already"]


def test_lines_are_counted_by_the_csv_reader(sheet_dir):
    """Quoted prompts over several lines (LF and CRLF), blank and whitespace-only lines: each row's
    line is the one it starts on, in the problems and on the rows."""
    text = ('id,image,prompt\r\n'
            'a,img/a.png,"one\r\ntwo\r\nthree"\r\n'
            '\r\n'
            '   \r\n'
            'b,img/a.png,"x\n\ny"\n'
            '\t\n'
            'c,img/nope.png,z\n')
    found = problems(sheet_dir, text)
    assert found == [f"row 3 (line 11, id 'c'), column 'image': 'img/nope.png' does not exist "
                     f"(looked for {sheet_dir / 'img' / 'nope.png'})"]
    a, b = read(sheet_dir, text.replace("nope", "a"))[:2]
    assert (a.line, b.line) == (2, 7) and a.prompt == "one\r\ntwo\r\nthree" and b.prompt == "x\n\ny"


def test_a_row_with_more_cells_than_columns_is_named(sheet_dir):
    """An unquoted comma in a prompt: the row is named, not read with its cells shifted."""
    found = problems(sheet_dir, 'id,image,prompt\na,img/a.png,"a cat, a dog"\nb,img/a.png,a cat, a dog\n')
    assert found == ["row 2 (line 3, id 'b'): 4 cells, but the header names 3 columns "
                     '(a cell that holds a comma must be in double quotes: "a, b")']


@pytest.mark.parametrize("text, message", [
    ('id,image,prompt\na,img/a.png,"open\nb,img/a.png,x\n',
     "cannot be read as a CSV file: line 2: a quoted cell that starts on this line is never closed"),
    ('id,image,prompt\na,img/a.png,"say "hi" now"\n', "cannot be read as a CSV file: line 2: "),
    ("", "the sheet is empty; its first line names the columns: id, image, prompt"),
    ("id,image,prompt,seed,seed,\na,img/a.png,x,1,2,\n", "column(s) 'seed' appear more than once in the header"),
    ("id,image,prompt,\na,img/a.png,x,\n", "header cell(s) 4 name no column (a trailing comma?)"),
])
def test_sheet_level_problems(sheet_dir, text, message):
    assert any(message in p for p in problems(sheet_dir, text))


def test_empty_sheet_and_missing_file(sheet_dir):
    assert problems(sheet_dir, "id,image,prompt\n") == ["the sheet has no rows"]
    with pytest.raises(SheetError, match="does not exist"):
        read_rows(sheet_dir / "none.csv", DEFAULTS, SCHEMA)


def test_not_utf8(sheet_dir):
    (sheet_dir / "sheet.csv").write_bytes("id,image,prompt\na,img/a.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(SheetError, match="UTF-8"):
        read_rows(sheet_dir / "sheet.csv", DEFAULTS, SCHEMA)


def test_adaptive_size_too_large_is_refused(sheet_dir):
    write_image(sheet_dir / "img" / "tall.png", 100, 4000)
    found = problems(sheet_dir, "id,image,prompt,adaptive\nt,img/tall.png,x,true\n")
    assert "above 2048" in found[0] and "row 1 (line 2, id 't')" in found[0]


def test_defaults_checked():
    with pytest.raises(SheetError, match="defaults.num_frames: 80 is not 4k\\+1"):
        check_defaults({**DEFAULTS, "num_frames": 80})
    with pytest.raises(SheetError, match="together"):
        check_defaults({**DEFAULTS, "width": 64})
    check_defaults(DEFAULTS)


def test_truncated_image_is_caught_by_decoding(sheet_dir):
    from PIL import Image

    Image.open(sheet_dir / "img" / "a.png").save(sheet_dir / "img" / "full.jpg", quality=95)
    data = (sheet_dir / "img" / "full.jpg").read_bytes()
    (sheet_dir / "img" / "cut.jpg").write_bytes(data[: len(data) // 2])
    found = problems(sheet_dir, "id,image,prompt\nc,img/cut.jpg,x\n")
    assert "row 1 (line 2, id 'c'), column 'image'" in found[0] and "truncated" in found[0]
    # jobs re-reading the sheet only look at the header, which is intact
    (sheet_dir / "sheet.csv").write_text("id,image,prompt\nc,img/cut.jpg,x\n")
    assert read_rows(sheet_dir / "sheet.csv", DEFAULTS, SCHEMA, decode_images=False)[0].id == "c"


def test_decompression_bomb_is_refused(sheet_dir):
    from PIL import Image

    Image.new("1", (9000, 9000)).save(sheet_dir / "img" / "bomb.png")
    found = problems(sheet_dir, "id,image,prompt\nb,img/bomb.png,x\n")
    assert "column 'image'" in found[0] and "pixel" in found[0]


# ------------------------------------------------------------------ prompt length (umT5 reads 512 tokens)


def test_prompt_token_counts_count_as_the_text_stage_tokenizes(demo_models):
    """The same count as the transformers tokenizer the text stage uses, on the cleaned prompt, with
    EOS and without umT5's cut at 512; {} while the tokenizer folder has no tokenizer.json."""
    from turbowan.wan.models import load_tokenizer
    from turbowan.wan.text import clean_prompt, tokenize

    tokenizer = load_tokenizer(demo_models["tokenizer"])
    prompts = {"short": "a cat  walks\n\n in the   rain &amp;amp; snow", "empty": " ", "long": "a red car " * 300}
    counts = prompt_token_counts(prompts, demo_models["tokenizer"])
    assert set(counts) == set(prompts)
    for key in ("short", "empty"):
        assert counts[key] == int(tokenize(tokenizer, prompts[key])[1].sum())  # what umT5 gets
    assert counts["long"] == len(tokenizer(clean_prompt(prompts["long"]), truncation=False)["input_ids"]) > 900
    assert int(tokenize(tokenizer, prompts["long"])[1].sum()) == 512  # the cut the count tells of
    assert counts["empty"] == 1  # EOS
    assert prompt_token_counts(prompts, demo_models["tokenizer"] + "-not-made-yet") == {}


def test_long_prompts_are_named_with_their_row_line_and_tokens(sheet_dir, demo_models):
    long = "a red car " * 200
    text = f'id,image,prompt\nshort,img/a.png,a cat\nboat,img/a.png,"{long}"\nboat2,img/a.png,"{long}"\n'
    rows = read(sheet_dir, text)
    counts = prompt_token_counts({row.prompt_key: row.prompt for row in rows}, demo_models["tokenizer"])
    tokens = counts[rows[1].prompt_key]
    assert 512 < tokens and len(counts) == 2
    assert long_prompt_warnings(rows, counts) == [
        f"row 'boat' (line 3): its prompt has {tokens} tokens; umT5 reads the first 512, the rest is ignored",
        f"row 'boat2' (line 4): its prompt has {tokens} tokens; umT5 reads the first 512, the rest is ignored",
    ]
    assert long_prompt_warnings(rows, counts, limit=tokens) == []
    assert long_prompt_warnings(rows, {}) == []  # no tokenizer yet: nothing to say


# ------------------------------------------------------------------ first-last frame and chained rows

CHAIN_HEADER = "id,image,last_image,prompt,width,height,chain\n"


def test_last_image_and_row_references_are_read(sheet_dir):
    text = CHAIN_HEADER + ("a,img/a.png,,x,64,48,walk\n"
                           "b,@a,img/wide.png,y,,,walk\n"  # size: a's (the part before)
                           "c, @b ,@a,z,,,\n"  # spaces around the id are ignored
                           "d,img/a.png,,w,,,\n")
    a, b, c, d = read(sheet_dir, text)
    assert (a.last_image, a.chain, a.references()) == (None, "walk", {})
    assert b.image == "@a" and b.last_image == str((sheet_dir / "img" / "wide.png").resolve())
    assert (b.width, b.height, b.chain) == (64, 48, "walk") and b.references() == {"image": "a"}
    assert c.references() == {"image": "b", "last_image": "a"} and (c.width, c.height) == (64, 48)
    assert (d.width, d.height, d.last_image, d.chain) == (1280, 720, None, None)  # the preset, as before


def test_a_referenced_row_may_come_later_in_the_sheet(sheet_dir):
    b, a = read(sheet_dir, CHAIN_HEADER + "b,@a,,y,,,\na,img/a.png,,x,32,48,\n")
    assert (b.width, b.height) == (32, 48)


BAD_CHAIN_CELLS = [
    ("r,img/a.png,img/missing.png,x,,,", "last_image", "'img/missing.png' does not exist"),
    ("r,img/a.png,img/broken.png,x,,,", "last_image", "cannot be read as an image"),
    ("r,@nobody,,x,,,", "image", "'@nobody' names no row of the sheet"),
    ("r,img/a.png,@nobody,x,,,", "last_image", "'@nobody' names no row of the sheet"),
    ("r,@,,x,,,", "image", "'@' names no row of the sheet"),
    ("r,@r,,x,,,", "image", "closes a cycle of rows, each starting from the next one's frames: r -> r"),
    ("r,img/a.png,,x,,,bad/name", "chain", "may only use letters"),
    ("r,img/a.png,,x,,,.hidden", "chain", "may only use letters"),
    ("r,img/a.png,,x,32,32,c", "chain", "must share one size; this row is 32x32, row 'ok' is 64x48"),
]


@pytest.mark.parametrize("line, column, message", BAD_CHAIN_CELLS, ids=[f"{c}:{m}" for _, c, m in BAD_CHAIN_CELLS])
def test_each_bad_chain_or_last_image_cell_is_named(sheet_dir, line, column, message):
    (sheet_dir / "img" / "broken.png").write_bytes(b"\x89PNG garbage")
    found = problems(sheet_dir, CHAIN_HEADER + "ok,img/a.png,,fine,64,48,c\n" + line + "\n")
    assert len(found) == 1, found
    assert "row 2 (line 3, id 'r')" in found[0] and f"column '{column}'" in found[0] and message in found[0], found[0]


def test_a_cycle_through_several_rows_is_named_once_with_its_rows(sheet_dir):
    found = problems(sheet_dir, CHAIN_HEADER + "a,@c,,x,,,\nb,@a,,y,,,\nc,img/a.png,@b,z,,,\nd,@a,,w,,,\n")
    assert found == ["row 2 (line 3, id 'b'), column 'image': '@a' closes a cycle of rows, each starting "
                     "from the next one's frames: a -> c -> b -> a"], found  # (d, outside it, is no problem)


def test_a_row_that_starts_from_a_bad_row_waits_for_its_fix_without_a_problem_of_its_own(sheet_dir):
    found = problems(sheet_dir, CHAIN_HEADER + "a,img/nope.png,,x,,,\nb,@a,,y,,,\n")
    assert len(found) == 1 and "id 'a'), column 'image'" in found[0], found


def test_a_file_whose_name_starts_with_at_is_written_with_its_folder(sheet_dir):
    write_image(sheet_dir / "@a.png", 32, 32)
    (row,) = read(sheet_dir, "id,image,prompt\nr,./@a.png,x\n")
    assert row.image == str((sheet_dir / "@a.png").resolve()) and row.references() == {}
    found = problems(sheet_dir, "id,image,prompt\nr,@a.png,x\n")
    assert "'@a.png' names no row of the sheet (an image file whose name starts with '@' is written ./@name)" in found[0]


def test_chains_is_a_name_no_row_may_take(sheet_dir):
    found = problems(sheet_dir, "id,image,prompt\nchains,img/a.png,x\n")
    assert "column 'id'" in found[0] and "batch's own files or folders" in found[0]


def test_a_chain_of_thousands_of_rows_is_read_without_deep_recursion(sheet_dir):
    from turbowan.sheet import chain_depths, continues

    links = 3000  # (recursion would stop near 1000)
    lines = ["a0,img/a.png,,x,32,48,long"] + [f"a{i},@a{i - 1},,x,,,long" for i in range(1, links)]
    rows = read(sheet_dir, CHAIN_HEADER + "\n".join(reversed(lines)) + "\n")  # every row before the one it needs
    assert {(row.width, row.height) for row in rows} == {(32, 48)}
    depths = chain_depths(rows)
    assert depths["a0"] == 0 and depths[f"a{links - 1}"] == links - 1
    assert continues(rows) == [False] * links  # in sheet order each row comes before the one it continues
    loop = problems(sheet_dir, CHAIN_HEADER + "\n".join([f"a{i},@a{(i + 1) % links},,x,,," for i in range(links)]) + "\n")
    assert len(loop) == 1 and "closes a cycle of rows" in loop[0] and loop[0].count(" -> ") == links
