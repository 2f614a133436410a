"""The flag store (issue 16): a real SQLite file, created and migrated with a schema version; the
``fairtune flag`` commands; the exported prompt file that ``fairtune audit`` reads."""

from __future__ import annotations

import json
import re
import sqlite3
import sys

import pytest
from conftest import COLORS
from test_distributed import tiny_base  # noqa: F401 - a fixture

from fairtune.cli import main
from fairtune.data import (
    SCHEMA_VERSION,
    Flag,
    FlagStore,
    Proposal,
    content_hash,
    read_prompt_pairs,
    write_prompt_file,
)
from fairtune.models import LORA_WEIGHT_NAME as LORA
from fairtune.train import FairnessLoss

CLF_ARGS = {"num_classes": 2, "width": 4, "feature_dim": 8}

# The version-1 schema, as a fairtune of that version created it (image flags only, no proposals).
V1_DDL = [
    "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at VARCHAR(40) NOT NULL)",
    """CREATE TABLE flags (
        id INTEGER PRIMARY KEY AUTOINCREMENT, created_at VARCHAR(40) NOT NULL,
        reviewer VARCHAR(200) NOT NULL, prompt TEXT NOT NULL, concept TEXT, model TEXT NOT NULL,
        model_hash VARCHAR(64), adapter TEXT, adapter_hash VARCHAR(64), audit_run TEXT,
        image_index INTEGER, seed INTEGER, attribute VARCHAR(200), direction VARCHAR(200),
        note TEXT NOT NULL DEFAULT '')""",
    "INSERT INTO schema_version VALUES (1, '2026-01-01T00:00:00+00:00')",
    """INSERT INTO flags (created_at, reviewer, prompt, concept, model, audit_run, image_index, seed,
        attribute, direction, note)
       VALUES ('2026-01-01T00:00:00+00:00', 'ana', 'a handwritten digit 8', 'digit 8', 'base', 'runs/a',
        3, 3, 'color', 'blue', 'old flag')""",
]


def test_a_new_store_creates_its_schema_and_keeps_flags(tmp_path):
    db = tmp_path / "sub" / "flags.sqlite"
    store = FlagStore(db)
    assert db.is_file() and store.version == SCHEMA_VERSION
    fid = store.add_flag(
        Flag(prompt="a handwritten digit 8", model="m", reviewer="bo", scope="image", concept="digit 8",
             audit_run="runs/audit", image_index=5, seed=5, settings={"steps": 10}, attribute="color",
             direction="blue", note="all blue")
    )  # fmt: skip
    store.add_proposal(Proposal(prompt="a drawing of the number 9", reviewer="bo", concept="digit 9"))
    store.close()
    # read back through plain sqlite3: the row is really in the file
    con = sqlite3.connect(db)
    row = con.execute("SELECT id, reviewer, image_index, settings, direction FROM flags").fetchone()
    assert row == (fid, "bo", 5, '{"steps": 10}', "blue")
    assert con.execute("SELECT max(version) FROM schema_version").fetchone() == (SCHEMA_VERSION,)
    con.close()
    again = FlagStore(db)
    (f,) = again.flags()
    assert f.settings == {"steps": 10} and f.created_at and f.scope == "image"
    assert [p.prompt for p in again.proposals()] == ["a drawing of the number 9"]


def test_an_older_file_is_migrated_forward_and_keeps_its_rows(tmp_path):
    db = tmp_path / "v1.sqlite"
    con = sqlite3.connect(db)
    for stmt in V1_DDL:
        con.execute(stmt)
    con.commit()
    con.close()
    store = FlagStore(db)
    assert store.version == SCHEMA_VERSION == 2
    (old,) = store.flags()
    assert (old.prompt, old.direction, old.note, old.scope, old.settings) == (
        "a handwritten digit 8", "blue", "old flag", "image", None,
    )  # fmt: skip
    store.add_proposal(Proposal(prompt="p", reviewer="x"))  # the table version 2 added
    store.add_flag(Flag(prompt="q", model="m", reviewer="x", scope="prompt", settings={"a": 1}))
    versions = [r[0] for r in sqlite3.connect(db).execute("SELECT version FROM schema_version ORDER BY 1")]
    assert versions == [1, 2]


def test_bad_stores_and_flags_fail_clearly(tmp_path):
    newer = tmp_path / "newer.sqlite"
    con = sqlite3.connect(newer)
    con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT)")
    con.execute("INSERT INTO schema_version VALUES (99, 'x')")
    con.commit()
    con.close()
    with pytest.raises(ValueError, match="schema version 99 is newer"):
        FlagStore(newer)
    foreign = tmp_path / "foreign.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE flags (x INTEGER)")
    con.commit()
    con.close()
    with pytest.raises(ValueError, match="no schema_version table"):
        FlagStore(foreign)
    store = FlagStore(tmp_path / "ok.sqlite")
    with pytest.raises(ValueError, match="reviewer must not be empty"):
        store.add_flag(Flag(prompt="p", model="m", reviewer=" "))
    with pytest.raises(ValueError, match="scope"):
        store.add_flag(Flag(prompt="p", model="m", reviewer="r", scope="batch"))


def test_content_hash_follows_the_bytes_not_the_location(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "w.safetensors").write_bytes(b"\x00\x01weights")
        (d / ".tmp").write_bytes(b"ignored")
    assert content_hash(a) == content_hash(b)
    (b / "w.safetensors").write_bytes(b"\x00\x02weights")
    assert content_hash(a) != content_hash(b)
    with pytest.raises(FileNotFoundError, match="nothing to hash"):
        content_hash(tmp_path / "missing")


def test_flag_commands_and_export_roundtrip_through_the_audit_reader(tmp_path, capsys, monkeypatch):
    from fairtune.eval import load_prompt_file

    db = str(tmp_path / "flags.sqlite")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "audit").mkdir()  # an audit folder, named relative to the working directory
    common = ["--db", db, "--model", "colored-digits-16", "--reviewer", "ana", "--attribute", "color"]
    main(["flag", "add", *common, "--prompt", "a handwritten digit 8", "--concept", "digit 8",
          "--direction", "blue", "--adapter", str(adapter)])  # fmt: skip
    main(["flag", "add", *common, "--prompt", "a drawing of the number 8", "--concept", "digit 8",
          "--scope", "image", "--audit_run", "audit", "--image_index", "2", "--seed", "2",
          "--settings", '{"steps": 15, "guidance_scale": 2.0}'])  # fmt: skip
    main(["flag", "add", *common, "--prompt", "a handwritten digit 8", "--concept", "digit 8"])
    main(["flag", "propose", "--db", db, "--prompt", "a handwritten digit 9", "--concept", "digit 9",
          "--reviewer", "bo"])  # fmt: skip
    capsys.readouterr()
    main(["flag", "list", "--db", db, "--json_lines", "true"])
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert [r.get("proposal", False) for r in lines] == [False, False, False, True]
    assert lines[0]["adapter_hash"] == content_hash(adapter) and lines[0]["model_hash"] is None
    assert lines[1]["settings"] == {"steps": 15, "guidance_scale": 2.0} and lines[1]["image_index"] == 2
    assert lines[1]["audit_run"] == str((tmp_path / "audit").resolve())  # as the review page stores it
    main(["flag", "list", "--db", db])
    table = capsys.readouterr().out
    assert "a drawing of the number 8" in table and "proposed prompts:" in table

    out = tmp_path / "flagged.yaml"
    main(["flag", "export", "--db", db, "--out", str(out)])
    assert read_prompt_pairs(out) == [
        ("digit 8", "a handwritten digit 8"),
        ("digit 8", "a drawing of the number 8"),
        ("digit 9", "a handwritten digit 9"),
    ]
    groups = load_prompt_file(out)  # what `fairtune audit --prompts` reads
    entries = [(e.role, e.concept, e.prompt) for g in groups for e in g.entries()]
    assert entries == [
        ("seen", "digit 8", "a handwritten digit 8"),
        ("seen", "digit 9", "a handwritten digit 9"),
        ("paraphrase", "digit 8", "a drawing of the number 8"),
    ]
    # only prompts flagged twice, no proposals
    main(["flag", "export", "--db", db, "--out", str(out), "--proposals", "false", "--min_flags", "2"])
    assert read_prompt_pairs(out) == [("digit 8", "a handwritten digit 8")]
    with pytest.raises(ValueError, match="no prompt to write"):
        main(["flag", "export", "--db", db, "--out", str(out), "--proposals", "false", "--min_flags", "9"])


def test_prompt_files_in_every_audit_format(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\na b\n\nc d\n")
    assert read_prompt_pairs(txt) == [("a b", "a b"), ("c d", "c d")]
    groups = tmp_path / "g.yaml"
    groups.write_text(
        "- {name: s, template: 'a handwritten digit {value}', values: [1, 2], concept: 'digit {value}'}\n"
        "- {name: p, role: paraphrase, prompts: {digit 3: a drawing of the number 3}}\n"
    )
    assert read_prompt_pairs(groups) == [
        ("digit 1", "a handwritten digit 1"),
        ("digit 2", "a handwritten digit 2"),
        ("digit 3", "a drawing of the number 3"),
    ]
    out = write_prompt_file({"x": ["p1", "p2"]}, tmp_path / "o.txt")
    assert read_prompt_pairs(out) == [("p1", "p1"), ("p2", "p2")]
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 3\n")
    with pytest.raises(ValueError, match="bad.yaml.*cannot read entry 3"):
        read_prompt_pairs(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompt_pairs(tmp_path / "none.txt")


# ------------------------------------------------------------------ flags -> the next adapter (fit)
def test_fit_continues_from_an_adapter_and_trains_on_flagged_prompts(digits_dir, tiny_base, tmp_path):  # noqa: F811
    import torch
    from conftest import smoke_trainer
    from safetensors.torch import load_file, save_file
    from test_distributed import tiny_config

    from fairtune.colored_digits import SmallCNN
    from fairtune.data import AttributeDataModule, SourceConfig
    from fairtune.models import BackboneConfig, ClassifierConfig, LoraConfig, lora_state_dict
    from fairtune.train import DebiasModule, FairnessConfig

    # a first adapter, trained by `fairtune fit`
    run = tmp_path / "first"
    main(["fit", "--config", str(tiny_config(digits_dir, tiny_base, tmp_path / "fit.yaml")),
          "--trainer.max_steps", "2", "--trainer.default_root_dir", str(run)])  # fmt: skip
    saved = {k.removeprefix("unet."): v for k, v in load_file(str(run / "adapter" / LORA)).items()}

    # a reviewer flags a prompt the data never had; the flags are exported as a prompt file
    store = FlagStore(tmp_path / "flags.sqlite")
    store.add_flag(Flag(prompt="a drawing of the number 8", concept="digit 8", model=str(tiny_base),
                        reviewer="ana", direction="blue"))  # fmt: skip
    flagged = write_prompt_file(store.flagged_prompts(), tmp_path / "flagged.yaml")

    torch.manual_seed(0)
    clf = tmp_path / "clf.safetensors"
    save_file(SmallCNN(2, 4, 8).state_dict(), str(clf))
    module = DebiasModule(
        backbone=BackboneConfig(kind="tiny", pretrained=str(tiny_base)),
        lora=LoraConfig(rank=4, init_from=str(run / "adapter")),
        fairness=FairnessConfig(
            classifier=ClassifierConfig(
                module="fairtune.colored_digits.SmallCNN", init_args=CLF_ARGS, weights=str(clf)
            ),
            concepts=["digit 0"], extra_prompts_file=str(flagged), prompt="a handwritten {concept}",
            start_step=0, ramp_steps=0,
            every_k_steps=1,
            concepts_per_step=2, samples_per_concept=2, ddim_steps=1, preservation_weight=0.0,
        ),
    )  # fmt: skip
    # the new run starts from the first adapter's weights, not from a fresh adapter
    start = lora_state_dict(module.backbone.unet)
    assert start.keys() == saved.keys() and all(torch.equal(start[k], saved[k]) for k in saved)
    assert module.fairness_loss.pool() == [
        ("digit 0", "a handwritten digit 0"),
        ("digit 8", "a drawing of the number 8"),
    ]
    dm = AttributeDataModule(attributes=COLORS, source=SourceConfig(path=str(digits_dir / "table")),
                             concepts=["digit 0", "digit 1"], batch_size=4, samples_per_epoch=8)  # fmt: skip
    trainer = smoke_trainer(max_steps=2)
    trainer.fit(module, dm)
    # the fairness loss generated for the flagged wording (prompts need no images) and trained on it
    assert "a drawing of the number 8" in module.backbone._prompt_cache
    assert "fairness/align" in trainer.logged_metrics
    after = lora_state_dict(module.backbone.unet)
    assert any(not torch.equal(after[k], saved[k]) for k in saved)

    bad = LoraConfig(rank=2, init_from=str(run / "adapter"))
    with pytest.raises(ValueError, match="saved with r=4, but model.lora has r=2"):
        DebiasModule(backbone=BackboneConfig(kind="tiny", pretrained=str(tiny_base)), lora=bad)
    with pytest.raises(FileNotFoundError, match="no pytorch_lora_weights.safetensors"):
        DebiasModule(backbone=BackboneConfig(kind="tiny", pretrained=str(tiny_base)),
                     lora=LoraConfig(rank=4, init_from=str(tmp_path)))  # fmt: skip
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        FairnessLoss(
            FairnessConfig(
                classifier=ClassifierConfig(
                    module="fairtune.colored_digits.SmallCNN",
                    init_args={"num_classes": 2, "width": 4, "feature_dim": 8},
                    weights=str(clf),
                ),
                extra_prompts_file=str(tmp_path / "missing.yaml"),
            )
        )


def test_flag_text_becomes_one_prompt_line_and_prints_without_escapes(tmp_path, capsys):
    from fairtune.cli import flag_export, flag_list

    db = tmp_path / "flags.sqlite"
    store = FlagStore(db)
    store.add_proposal(Proposal(prompt="a nurse\n# not a comment\nat night", reviewer="web"))
    store.add_flag(
        Flag(prompt="a doctor", model="m", reviewer="web", scope="prompt", note="\x1b[2J\x1b[31mred\x07")
    )
    store.close()
    out = tmp_path / "prompts.txt"
    flag_export(db=str(db), out=out)
    assert out.read_text().splitlines() == ["a doctor", "a nurse # not a comment at night"]
    capsys.readouterr()
    flag_list(db=str(db))
    printed = capsys.readouterr().out
    assert "\x1b" not in printed and "\x07" not in printed
    assert "red" in printed and "a nurse\\x0a# not a comment" in printed


def test_a_db_that_is_not_a_flag_store_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """Issue 26: a corrupt file, a text file or a folder given as ``--db`` is an error of one line
    naming the path, from ``fairtune flag`` and ``fairtune review`` alike, and the file is left as it was."""
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(bytes(range(256)) * 20)
    text = tmp_path / "notes.sqlite"
    text.write_text("hello, this is not SQLite\n")
    folder = tmp_path / "a folder"
    folder.mkdir()
    audit = tmp_path / "audit"  # what `fairtune review` reads before it opens the store
    (audit / "images" / "0").mkdir(parents=True)
    (audit / "metrics.json").write_text(
        json.dumps({
            "methods": {"base": {"per_concept": {}}}, "prompts": [], "classes": ["red", "blue"],
            "generation": {"n_per_prompt": 2, "steps": 5, "guidance_scale": 1.0, "seed": 0},
        })
    )  # fmt: skip
    monkeypatch.delenv("FAIRTUNE_DEBUG", raising=False)
    cases = [
        (corrupt, "is not a flag database (file is not a database)"),
        (text, "is not a flag database (file is not a database)"),
        (folder, "is a directory, not a flag database file"),
    ]
    for db, why in cases:
        for args in (["flag", "list"], ["flag", "add", "--prompt", "p", "--model", "m"], ["flag", "propose",
                     "--prompt", "p"], ["review", "--audit", str(audit), "--port", "0"]):  # fmt: skip
            monkeypatch.setattr(sys, "argv", ["fairtune", *args, "--db", str(db)])
            with pytest.raises(SystemExit) as exit_:
                main()
            err = capsys.readouterr().err
            assert exit_.value.code == 2 and "Traceback" not in err and "sqlalchemy" not in err, (args, err)
            (line,) = err.strip().splitlines()
            assert line.startswith(f"fairtune: error: --db {db} {why}"), (args, line)
        with pytest.raises(ValueError, match=re.escape(f"--db {db} {why}")):
            FlagStore(db)
    assert corrupt.read_bytes() == bytes(range(256)) * 20 and folder.is_dir() and not any(folder.iterdir())
    with pytest.raises(ValueError, match=r"--db nope://u:\*\*\*@h/x is not a database URL"):
        FlagStore("nope://u:secret@h/x")
