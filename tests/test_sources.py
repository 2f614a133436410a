import io
import json
import logging
import tarfile

import datasets
import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from fairtune.data import (
    AttributeSpec,
    ColumnMap,
    Record,
    SchemaError,
    ShardDataset,
    SkipCounter,
    TableDataset,
    collate_records,
    write_shards,
)

SPEC = AttributeSpec({"color": ["red", "blue"]})


def _key(r: Record):
    return (r.prompt, r.concept, tuple(sorted(r.attributes.items())), r.image.tobytes())


def _records(n=12, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arr = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
        color = [None, "red", "blue"][i % 3]
        out.append(Record(Image.fromarray(arr), f"prompt {i}", f"c{i % 2}", {"color": color}))
    return out


def test_table_and_shards_give_the_same_records(digits_dir):
    table = TableDataset(digits_dir / "table", SPEC, split="train")
    from_table = sorted(_key(table[i]) for i in range(len(table)))
    shards = ShardDataset(str(digits_dir / "shards" / "train-*.tar"), SPEC)
    from_shards = sorted(_key(r) for r in shards)
    assert len(from_table) == len(from_shards) > 1000
    assert from_table == from_shards
    assert table.skipped == 0 and shards.skipped == 0


def test_parquet_with_column_mapping(tmp_path):
    recs = _records()
    rows = {
        "img": [r.image for r in recs],
        "text": [r.prompt for r in recs],
        "occupation": [r.concept for r in recs],
        "ink": [r.attributes["color"] for r in recs],
    }
    ds = datasets.Dataset.from_dict(
        rows,
        features=datasets.Features(
            {
                "img": datasets.Image(),
                "text": datasets.Value("string"),
                "occupation": datasets.Value("string"),
                "ink": datasets.Value("string"),
            }
        ),
    )
    ds.to_parquet(str(tmp_path / "part.parquet"))
    cols = ColumnMap(image="img", prompt="text", concept="occupation", attributes={"color": "ink"})
    got = TableDataset(str(tmp_path / "part.parquet"), SPEC, cols)
    assert [_key(got[i]) for i in range(len(got))] == [
        _key(r.__class__(**{**r.__dict__, "image": r.image.convert("RGB")})) for r in recs
    ]
    assert got[0].attributes == {"color": None}  # unknown label stays unknown


def test_imagefolder_with_metadata(tmp_path):
    recs = _records(6)
    with open(tmp_path / "metadata.jsonl", "w") as f:
        for i, r in enumerate(recs):
            r.image.save(tmp_path / f"{i}.png")
            f.write(
                json.dumps(
                    {
                        "file_name": f"{i}.png",
                        "prompt": r.prompt,
                        "concept": r.concept,
                        "color": r.attributes["color"],
                    }
                )
                + "\n"
            )
    got = TableDataset(str(tmp_path), SPEC)
    assert sorted(_key(got[i]) for i in range(len(got))) == sorted(_key(r) for r in recs)


def test_missing_column_is_named():
    ds = datasets.Dataset.from_dict({"image": [b""], "prompt": ["p"], "concept": ["c"]})
    with pytest.raises(SchemaError, match="missing attribute 'color' column 'color'"):
        TableDataset(ds, SPEC)
    with pytest.raises(SchemaError, match="missing prompt column 'caption'"):
        TableDataset(ds, SPEC, ColumnMap(prompt="caption", attributes={"color": "prompt"}))


def test_undeclared_class_in_table_fails_at_load():
    ds = datasets.Dataset.from_dict({"image": [b""], "prompt": ["p"], "concept": ["c"], "color": ["green"]})
    with pytest.raises(SchemaError, match="class 'green', which is not declared"):
        TableDataset(ds, SPEC)


def test_corrupt_image_in_table_is_skipped_and_counted():
    good = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(good, format="PNG")
    ds = datasets.Dataset.from_dict(
        {
            "image": [
                {"bytes": good.getvalue(), "path": None},
                {"bytes": b"not a png", "path": None},
            ]
            * 2,
            "prompt": ["p"] * 4,
            "concept": ["c"] * 4,
            "color": ["red"] * 4,
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "prompt": datasets.Value("string"),
                "concept": datasets.Value("string"),
                "color": datasets.Value("string"),
            }
        ),
    )
    table = TableDataset(ds, SPEC)
    batches = list(DataLoader(table, batch_size=4, collate_fn=collate_records, num_workers=0))
    assert len(batches) == 1 and len(batches[0]) == 2
    assert table.skipped == 2


def _rewrite_member(src, dst, bad_key):
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name == bad_key:
                data = b"\x89PNG garbage"
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data))


def test_corrupt_shard_member_and_truncated_shard_are_skipped(tmp_path):
    recs = _records(12)
    paths = write_shards(recs, tmp_path / "ok", per_shard=4)
    assert len(paths) == 3
    bad = tmp_path / "bad"
    bad.mkdir()
    _rewrite_member(paths[0], bad / "a.tar", "00000001.png")
    # truncate the second shard inside its fourth member's image data (512-byte header + data each)
    raw = open(paths[1], "rb").read()
    (bad / "b.tar").write_bytes(raw[: 7 * 1024 + 512 + 100])
    (bad / "c.tar").write_bytes(open(paths[2], "rb").read())
    for name, src in (("a.tar", paths[0]), ("b.tar", paths[1]), ("c.tar", paths[2])):
        (bad / (name + ".index.json")).write_bytes(open(src + ".index.json", "rb").read())
    urls = [str(bad / "a.tar"), str(bad / "b.tar"), str(bad / "c.tar")]
    ds = ShardDataset(urls, SPEC, max_skipped_share=None)
    got = list(ds)
    keys = {_key(r) for r in got}
    assert _key(recs[1]) not in keys  # the corrupt member
    assert {_key(recs[i]) for i in (0, 2, 3, 8, 9, 10, 11)} <= keys  # intact shards survive
    # counted per record: every record not delivered is one skipped, the truncated shard's too
    assert ds.skipped == 12 - len(got) >= 2
    # with the default ceiling (1%) the job stops, naming the source
    with pytest.raises(SchemaError, match=r"a\.tar.*could not be read.*max_skipped_share"):
        list(ShardDataset(urls, SPEC))


def test_a_missing_or_garbage_shard_is_an_error_naming_it(tmp_path):
    paths = write_shards(_records(4), tmp_path / "ok", per_shard=4)
    with pytest.raises(SchemaError, match="shard '.*nope.tar' does not exist"):
        ShardDataset([paths[0], str(tmp_path / "nope.tar")], SPEC)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(SchemaError, match="garbage.tar' is not a readable tar archive"):
        list(ShardDataset([str(garbage)], SPEC))


def test_a_table_of_unreadable_images_stops_the_job(tmp_path):
    n = 120
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b"not a png", "path": None}] * n, "prompt": ["p"] * n, "concept": ["c"] * n,
         "color": ["red"] * n},
        features=datasets.Features(
            {"image": datasets.Image(), "prompt": datasets.Value("string"),
             "concept": datasets.Value("string"), "color": datasets.Value("string")}
        ),
    )  # fmt: skip
    with pytest.raises(SchemaError, match="all 4 records of a batch were unreadable"):
        next(
            iter(
                DataLoader(
                    TableDataset(ds, SPEC, max_skipped_share=None), batch_size=4, collate_fn=collate_records
                )
            )
        )
    with pytest.raises(SchemaError, match="100 of 100 records could not be read"):
        list(DataLoader(TableDataset(ds, SPEC), batch_size=200, collate_fn=collate_records))


def test_a_table_of_unreadable_images_warns_a_few_times_then_stops(caplog):
    """Issue 26: the one-line error comes after three warnings and one line saying the rest are only
    counted, not after a warning per image."""
    n = 120
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b"not a png", "path": None}] * n, "prompt": ["p"] * n, "concept": ["c"] * n,
         "color": ["red"] * n},
        features=datasets.Features(
            {"image": datasets.Image(), "prompt": datasets.Value("string"),
             "concept": datasets.Value("string"), "color": datasets.Value("string")}
        ),
    )  # fmt: skip
    table = TableDataset(ds, SPEC)
    with caplog.at_level(logging.WARNING, logger="fairtune.data"):
        with pytest.raises(SchemaError, match="100 of 100 records could not be read"):
            list(DataLoader(table, batch_size=200, collate_fn=collate_records))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("fairtune.data")]
    assert len(lines) == 4, lines
    assert all(ln.startswith("skipping record ") for ln in lines[:3])
    assert lines[3].startswith("skipping more unreadable records in the table (4 of 4 so far)")
    assert table.skipped == 100  # every one still counted
    # a pass that ends under its ceiling reports its total in one line
    caplog.clear()
    counter = SkipCounter("shards 'x.tar'", max_share=None)
    with caplog.at_level(logging.WARNING, logger="fairtune.data"):
        for i in range(50):
            counter.read()
            counter.skip(f"member {i}", "truncated")
        counter.check(final=True)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("fairtune.data")]
    assert len(lines) == 5 and lines[-1] == "skipped 50 of 100 records in shards 'x.tar' in all"


def test_shards_split_across_ranks_and_workers(tmp_path):
    recs = _records(24)
    paths = write_shards(recs, tmp_path, per_shard=3)  # 8 shards
    everything = sorted(_key(r) for r in ShardDataset(paths, SPEC, rank=0, world_size=1))
    parts = []
    for rank in range(2):
        ds = ShardDataset(paths, SPEC, rank=rank, world_size=2)
        for worker in range(2):
            shards = ds.shards_for(rank, 2, worker, 2)
            parts.append([_key(r) for r in ShardDataset(shards, SPEC, rank=0, world_size=1)])
    flat = [k for p in parts for k in p]
    assert len(flat) == len(set(flat)) == 24  # no overlap
    assert sorted(flat) == everything  # together the whole epoch
    assert all(len(p) == 6 for p in parts)


def test_shards_iterate_per_worker_in_a_dataloader(tmp_path):
    paths = write_shards(_records(12), tmp_path, per_shard=3)
    loader = DataLoader(ShardDataset(paths, SPEC), batch_size=None, num_workers=2, collate_fn=lambda r: r)
    keys = [_key(r) for r in loader]
    assert len(keys) == len(set(keys)) == 12


def test_too_few_shards_is_a_clear_error(tmp_path):
    paths = write_shards(_records(3), tmp_path, per_shard=3)
    with pytest.raises(SchemaError, match="1 shards cannot feed 2 ranks x 1 workers"):
        list(ShardDataset(paths, SPEC, rank=0, world_size=2))
