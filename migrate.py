"""Bringing a database to this code's schema through Alembic: telling what a database holds
(``schema_state``), upgrading it (``upgrade_db``, the release command), creating the embedded
SQLite database on first start, Alembic's configuration, and what each state means to a person.

It must not import SQLAlchemy or run SQL itself: ``dal`` runs the statements (the table names,
the revisions, release 1's stamp, the locked migration connection). Alembic is imported only
when a database has to change, so that start-up stays quick.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog

import dal

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

log = structlog.get_logger("mailslot.migrate")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def _newest_revision() -> str:
    """The head of the migrations, from the file names alone (no Alembic import at start-up):
    they are ``<revision>_<slug>.py``, numbered 0001 upwards (test_migrations holds them to it)."""
    versions = (MIGRATIONS_DIR / "versions").glob("[0-9][0-9][0-9][0-9]_*.py")
    return max(path.name[:4] for path in versions)


# A database at this revision needs nothing.
SCHEMA_REVISION = _newest_revision()
# Release 1 had no Alembic: it stamped mailslot_meta's schema_version "1" and refuses any other
# value. Its databases are stamped at RELEASE_1_REVISION and their stamp becomes "2".
RELEASE_1_STAMP = "1"
ALEMBIC_STAMP = "2"
RELEASE_1_REVISION = "0001"
RELEASE_1_TABLES = frozenset(
    {"mailslot_meta", "users", "forms", "submissions", "deliveries", "api_tokens"}
)

# =================================================================================================
# What a database holds
# =================================================================================================


class SchemaMismatch(RuntimeError):
    """The database cannot be brought to this code's schema; the message says why."""


SchemaKind = Literal["empty", "release-1", "current", "behind", "newer", "unrecognised"]


@dataclass(frozen=True)
class SchemaState:
    """What a database holds, as the upgrade command and /readyz see it."""

    kind: SchemaKind
    revision: str | None = None  # its Alembic revision, when it has one
    detail: str = ""  # for a person: what is wrong and what to do


def schema_state(conn: Any) -> SchemaState:
    """Tell an empty database, release 1's, one at the head, behind or ahead of this code."""
    names = dal.table_names(conn)
    revisions = dal.alembic_revisions(conn) if dal.ALEMBIC_VERSION_TABLE in names else []
    if revisions == [SCHEMA_REVISION]:
        return SchemaState("current", SCHEMA_REVISION)
    if len(revisions) == 1:
        revision = revisions[0]
        if revision in _known_revisions():
            return SchemaState(
                "behind",
                revision,
                f"The database is at revision {revision}; this Mailslot needs {SCHEMA_REVISION}.",
            )
        return SchemaState(
            "newer",
            revision,
            f"The database is at revision {revision}, which is newer than this Mailslot (its "
            f"newest is {SCHEMA_REVISION}): a later release upgraded it. Run that release or a "
            "newer one, or restore the backup taken before that upgrade.",
        )
    if revisions:
        return SchemaState(
            "unrecognised",
            None,
            f"The database is at several revisions at once ({', '.join(revisions)}), but this "
            "Mailslot's migrations form one line. Restore a backup, or use an empty database.",
        )
    ours = names & RELEASE_1_TABLES
    if not ours:
        return SchemaState("empty")
    stamp = dal.schema_stamp(conn) if dal.META_TABLE in names else None
    missing = ", ".join(sorted(RELEASE_1_TABLES - names))
    if stamp == RELEASE_1_STAMP and not missing:
        return SchemaState("release-1", None, "The database was made by release 1.")
    problem = (
        f"is stamped with Mailslot schema version {stamp}" if stamp else "has no version stamp"
    )
    return SchemaState(
        "unrecognised",
        None,
        f"The database holds Mailslot tables ({', '.join(sorted(ours))}) but {problem}"
        + (f" and lacks {missing}" if missing else "")
        + ", so this Mailslot cannot tell what it is. Restore a backup, or use an empty database.",
    )


_UPGRADE = "run flask --app microapp upgrade-db"
_READINESS = {
    "current": "ok",
    "empty": f"not initialised: {_UPGRADE}",
    "release-1": f"made by release 1: {_UPGRADE}",
    "behind": f"at revision {{revision}}, this code needs {{head}}: {_UPGRADE}",
    "newer": "at revision {revision}, newer than this code ({head}): run the matching release",
    "unrecognised": "not a database this code recognises: see flask --app microapp upgrade-db",
}


def readiness_text(state: SchemaState) -> str:
    """What /readyz says about the database's schema: "ok", or what to do."""
    return _READINESS[state.kind].format(revision=state.revision, head=SCHEMA_REVISION)


# =================================================================================================
# Upgrading
# =================================================================================================


def upgrade_db(url: str | None = None) -> list[str]:
    """Bring the database (the app's, or ``url``) to the newest revision; what changed, if any.

    An empty database gets every migration; one made by release 1 is stamped at 0001 without a
    row changing, then upgraded; one at an older revision is upgraded. Idempotent, and one process
    at a time: the others wait for the lock, then find nothing to do (an empty list). A database
    this code cannot read (newer, or unrecognised) raises SchemaMismatch and is left untouched;
    one the database cannot reach raises dal.DatabaseUnavailable.
    """
    try:
        with dal.migration_connection(url or dal.database_url()) as conn:
            state = schema_state(conn)
            if state.kind in ("newer", "unrecognised"):
                raise SchemaMismatch(state.detail)
            if state.kind == "current":
                return []
            from alembic import command

            config = alembic_config(conn)
            done: list[str] = []
            start = state.revision
            if state.kind == "release-1":
                command.stamp(config, RELEASE_1_REVISION)
                dal.set_schema_stamp(conn, ALEMBIC_STAMP)
                start = RELEASE_1_REVISION
                done.append(
                    f"Brought a database from release 1 under Alembic at revision {start}; "
                    "no row was changed."
                )
            command.upgrade(config, "head")
            steps = _revisions_after(start)
            if start is None:
                done.append(f"Created the database at revision {SCHEMA_REVISION} (head).")
            elif steps:
                done.append(f"Upgraded {' → '.join([start, *steps])} (head).")
    except dal.BrokenReferences as exc:
        raise SchemaMismatch(str(exc)) from None
    for line in done:
        log.info("database.upgraded", done=line)
    return done


def create_embedded_db() -> list[str]:
    """On start with SQLite, a missing database is created by the migrations; what was done.

    Only an empty database: upgrading one that holds data is the upgrade command's job, which
    `just run` and the release phase run first. A database that needs it is logged here.
    """
    with dal.connection() as conn:
        state = schema_state(conn)
    if state.kind == "empty":
        return upgrade_db()
    if state.kind != "current":
        log.warning("database.not_current", state=state.kind, detail=state.detail)
    return []


def alembic_config(connection: Any = None) -> AlembicConfig:
    """Alembic's configuration, in code (no alembic.ini): our migrations, on this connection."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


@cache
def _script_directory() -> ScriptDirectory:
    """The migration scripts (read once per process)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def _known_revisions() -> set[str]:
    """Every revision this code's migrations know."""
    return {script.revision for script in _script_directory().walk_revisions()}


def _revisions_after(start: str | None) -> list[str]:
    """The revisions from just after ``start`` up to the head, oldest first."""
    scripts = _script_directory().iterate_revisions("head", start or "base")
    return [script.revision for script in reversed(list(scripts))]
