"""Flags: reviewers' marks on biased outputs, and prompts they propose to audit next.

A flag records what a reviewer saw and where: the prompt (and its concept), the model and adapter
(by name and content hash), the image (the audit run folder and the image's index there, and the
seed and generation settings that regenerate it), the attribute and the direction seen (e.g.
``color`` / ``red``: too many red images), whether the whole prompt or one image is flagged, the
reviewer, a note and the time.

The store is a SQL database through SQLAlchemy Core: a SQLite file by default (``--db flags.sqlite``),
or any SQLAlchemy URL (``--db postgresql+psycopg://user:pass@host/fairtune``, with the driver
installed: ``pip install psycopg``) when many reviewers work on one database. The schema is created
by the project on first use and migrated forward when an older file is opened; its version lives in
the ``schema_version`` table.

``fairtune flag export`` writes flagged (and proposed) prompts as a prompt file (``data/_prompts.py``),
the kind ``fairtune audit --prompts`` and the fairness loss's ``extra_prompts_file`` read. The
``fairtune flag`` commands on the store live in ``fairtune.cli``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import sqlalchemy as sa

SCHEMA_VERSION = 2
"""The schema this code writes. History: 1 = flags (image flags only); 2 = adds ``flags.scope``
(image or prompt), ``flags.settings`` (the generation settings, JSON) and the ``proposals`` table."""

_meta = sa.MetaData()
schema_version = sa.Table(
    "schema_version",
    _meta,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", sa.String(40), nullable=False),
)
flags_table = sa.Table(
    "flags",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("reviewer", sa.String(200), nullable=False),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("concept", sa.Text),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("model_hash", sa.String(64)),
    sa.Column("adapter", sa.Text),
    sa.Column("adapter_hash", sa.String(64)),
    sa.Column("scope", sa.String(10), nullable=False, server_default="image"),
    sa.Column("audit_run", sa.Text),
    sa.Column("image_index", sa.Integer),
    sa.Column("seed", sa.Integer),
    sa.Column("settings", sa.Text),
    sa.Column("attribute", sa.String(200)),
    sa.Column("direction", sa.String(200)),
    sa.Column("note", sa.Text, nullable=False, server_default=""),
)
proposals_table = sa.Table(
    "proposals",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("reviewer", sa.String(200), nullable=False),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("concept", sa.Text),
    sa.Column("note", sa.Text, nullable=False, server_default=""),
)


def _migrate_1_to_2(conn: sa.Connection) -> None:
    conn.execute(sa.text("ALTER TABLE flags ADD COLUMN scope VARCHAR(10) NOT NULL DEFAULT 'image'"))
    conn.execute(sa.text("ALTER TABLE flags ADD COLUMN settings TEXT"))
    proposals_table.create(conn)


MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {1: _migrate_1_to_2}
"""``MIGRATIONS[v]`` moves a database from version ``v`` to ``v + 1`` (run in one transaction)."""


# ============================================================================================ records
@dataclass
class Flag:
    """One reviewer's flag on an image or a whole prompt.

    Attributes:
        prompt: The prompt the image was generated from.
        model: The base model (a folder or a shipped checkpoint name).
        reviewer: Who flagged it.
        scope: ``image`` (one image) or ``prompt`` (the prompt's whole batch).
        concept: The prompt's concept (targets and concept judges look concepts up by name); ``None``:
            the prompt is its own concept.
        model_hash: SHA-256 of the model's files (:func:`content_hash`), when they could be read.
        adapter: The LoRA adapter folder, if any.
        adapter_hash: SHA-256 of the adapter's files.
        audit_run: The audit folder the image comes from.
        image_index: The image's index within its prompt in that audit (image ``i`` used seed
            ``settings['seed'] + i``).
        seed: The seed of the image's initial noise.
        settings: Generation settings that regenerate it (steps, guidance scale, ...).
        attribute: The attribute the reviewer judged (e.g. ``color``).
        direction: The class seen over-represented (e.g. ``red``), or a short description.
        note: Free text.
        id: Row id (set by the store).
        created_at: ISO-8601 UTC time (set by the store).
    """

    prompt: str
    model: str
    reviewer: str
    scope: Literal["image", "prompt"] = "image"
    concept: str | None = None
    model_hash: str | None = None
    adapter: str | None = None
    adapter_hash: str | None = None
    audit_run: str | None = None
    image_index: int | None = None
    seed: int | None = None
    settings: dict | None = None
    attribute: str | None = None
    direction: str | None = None
    note: str = ""
    id: int | None = None
    created_at: str | None = None


@dataclass
class Proposal:
    """A prompt a reviewer proposes to audit next.

    Attributes:
        prompt: The prompt.
        reviewer: Who proposed it.
        concept: Its concept; ``None``: the prompt is its own concept.
        note: Free text.
        id: Row id (set by the store).
        created_at: ISO-8601 UTC time (set by the store).
    """

    prompt: str
    reviewer: str
    concept: str | None = None
    note: str = ""
    id: int | None = None
    created_at: str | None = None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) made one space, trimmed."""
    return " ".join(str(text).split())


def content_hash(path: str | os.PathLike) -> str:
    """SHA-256 over a file's bytes, or over a folder's files (relative path and bytes, sorted; hidden
    files and folders skipped), so the same weights hash the same wherever they lie."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        files = sorted(
            (p.relative_to(path).as_posix(), p)
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    else:
        raise FileNotFoundError(f"{str(path)!r} does not exist: nothing to hash")
    for rel, p in files:
        h.update(rel.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _hide_password(url: str) -> str:
    """``url`` with its password (if any) shown as ``***``."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url


def database_url(db: str | os.PathLike) -> str:
    """A SQLAlchemy URL for ``db``: a URL as it is (``postgresql+psycopg://...``), a path as SQLite."""
    text = str(db)
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


# ============================================================================================== store
class FlagStore:
    """The flag database: created on first use, migrated forward when older.

    Args:
        db: A SQLite file path (created with its folder) or a SQLAlchemy URL.

    Raises:
        ValueError: The database was written by a newer fairtune, holds a ``flags`` table without a
            schema version (not a fairtune flag store), cannot be opened or read as a database (a
            folder, a file that is not SQLite, a malformed URL), in one line naming ``db``.
    """

    def __init__(self, db: str | os.PathLike) -> None:
        url = database_url(db)
        shown = str(db) if url.startswith("sqlite:///") else _hide_password(url)
        if url.startswith("sqlite:///"):
            path = Path(url[len("sqlite:///") :])
            if path.is_dir():
                raise ValueError(f"--db {shown} is a directory, not a flag database file")
            path.parent.mkdir(parents=True, exist_ok=True)
        self.url = url
        try:
            self.engine = sa.create_engine(url)
            self.version = self._migrate()
        except sa.exc.DBAPIError as e:  # not a database, or none we can open: the driver's reason
            reason = one_line(str(e.orig).splitlines()[0] if str(e.orig) else type(e.orig).__name__)
            what = "cannot be opened as" if isinstance(e, sa.exc.OperationalError) else "is not"
            raise ValueError(f"--db {shown} {what} a flag database ({reason})") from e
        except sa.exc.ArgumentError as e:  # a URL SQLAlchemy cannot read, or an unknown dialect
            raise ValueError(f"--db {shown} is not a database URL SQLAlchemy knows ({one_line(e)})") from e

    def _migrate(self) -> int:
        with self.engine.begin() as conn:
            names = set(sa.inspect(conn).get_table_names())
            if "schema_version" not in names:
                if "flags" in names or "proposals" in names:
                    raise ValueError(
                        f"{self.url}: has a flags table but no schema_version table; "
                        "not a fairtune flag store"
                    )
                _meta.create_all(conn)
                conn.execute(schema_version.insert().values(version=SCHEMA_VERSION, applied_at=_now()))
                return SCHEMA_VERSION
            version = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
        if version is None:
            raise ValueError(f"{self.url}: the schema_version table is empty")
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"{self.url}: schema version {version} is newer than this fairtune's ({SCHEMA_VERSION}); "
                "upgrade fairtune"
            )
        while version < SCHEMA_VERSION:
            with self.engine.begin() as conn:
                MIGRATIONS[version](conn)
                version += 1
                conn.execute(schema_version.insert().values(version=version, applied_at=_now()))
        return version

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------------------------ writing
    def add_flag(self, flag: Flag) -> int:
        """Insert ``flag``; returns its id.

        Raises:
            ValueError: An empty prompt, model or reviewer, or a bad scope.
        """
        for name in ("prompt", "model", "reviewer"):
            if not str(getattr(flag, name) or "").strip():
                raise ValueError(f"flag: {name} must not be empty")
        if flag.scope not in ("image", "prompt"):
            raise ValueError(f"flag: scope must be 'image' or 'prompt', got {flag.scope!r}")
        row = {k: v for k, v in asdict(flag).items() if k not in ("id", "created_at")}
        row["settings"] = json.dumps(flag.settings, sort_keys=True) if flag.settings is not None else None
        row["created_at"] = _now()
        with self.engine.begin() as conn:
            return int(conn.execute(flags_table.insert().values(**row)).inserted_primary_key[0])

    def add_proposal(self, proposal: Proposal) -> int:
        """Insert ``proposal``; returns its id."""
        for name in ("prompt", "reviewer"):
            if not str(getattr(proposal, name) or "").strip():
                raise ValueError(f"proposal: {name} must not be empty")
        row = {k: v for k, v in asdict(proposal).items() if k not in ("id", "created_at")}
        row["created_at"] = _now()
        with self.engine.begin() as conn:
            return int(conn.execute(proposals_table.insert().values(**row)).inserted_primary_key[0])

    # ------------------------------------------------------------------------------------ reading
    def flags(self, *, prompt: str | None = None, audit_run: str | None = None) -> list[Flag]:
        """Flags, oldest first; optionally only those of one prompt or one audit run."""
        q = sa.select(flags_table).order_by(flags_table.c.id)
        if prompt is not None:
            q = q.where(flags_table.c.prompt == prompt)
        if audit_run is not None:
            q = q.where(flags_table.c.audit_run == audit_run)
        with self.engine.connect() as conn:
            rows = conn.execute(q).mappings().all()
        out = []
        for r in rows:
            d = dict(r)
            d["settings"] = json.loads(d["settings"]) if d["settings"] else None
            out.append(Flag(**d))
        return out

    def proposals(self) -> list[Proposal]:
        """Proposed prompts, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(proposals_table).order_by(proposals_table.c.id)).mappings().all()
        return [Proposal(**dict(r)) for r in rows]

    def flagged_prompts(self, *, proposals: bool = True, min_flags: int = 1) -> dict[str, list[str]]:
        """Concept -> distinct prompts (first flagged first) with at least ``min_flags`` flags, and
        (with ``proposals``) the proposed prompts after them."""
        counts: dict[tuple[str, str], int] = {}
        for f in self.flags():
            key = (f.concept or f.prompt, f.prompt)
            counts[key] = counts.get(key, 0) + 1
        pairs = [k for k, n in counts.items() if n >= min_flags]
        if proposals:
            pairs += [(p.concept or p.prompt, p.prompt) for p in self.proposals()]
        out: dict[str, list[str]] = {}
        for concept, prompt in pairs:
            # A prompt is one line: text from the review page may hold newlines, which a .txt
            # export would split into several prompts (and a "#" line would vanish as a comment).
            concept, prompt = one_line(concept), one_line(prompt)
            if prompt not in out.setdefault(concept, []):
                out[concept].append(prompt)
        return out
