# Mailslot tasks. `just run` serves in embedded mode; `just test` runs the whole suite.
set shell := ["bash", "-euo", "pipefail", "-c"]

redis_port := env_var_or_default("MAILSLOT_REDIS_PORT", "6390")

# List the recipes.
default:
    @just --list

# Create or update .venv from uv.lock (all extras: PostgreSQL support included), compiled to
# bytecode once: where PYTHONDONTWRITEBYTECODE is set, every process would compile from source.
sync:
    uv sync --locked --all-extras --quiet --compile-bytecode

# Serve on http://127.0.0.1:8000 (embedded mode unless REDIS_URL / DATABASE_URL are set), after
# creating or upgrading the database.
run: sync
    uv run --locked flask --app microapp upgrade-db
    uv run --locked flask --app microapp serve

# Start the next migration from dal.py's tables: Alembic compares them with a scratch SQLite
# database at the newest revision and writes migrations/versions/<next>_<message>.py. Review it.
migration message: sync
    #!/usr/bin/env bash
    set -euo pipefail
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    export DATABASE_URL="sqlite:///$scratch/head.db" INSTANCE_PATH="$scratch/instance" REDIS_URL=""
    uv run --locked flask --app microapp upgrade-db >/dev/null
    next="$(uv run --locked python -c 'import migrate; print(f"{int(migrate.SCHEMA_REVISION) + 1:04d}")')"
    uv run --locked alembic revision --autogenerate --rev-id "$next" -m {{quote(message)}}
    echo "Now edit it (names for new constraints, data to move, the downgrade), then: just test"

# Run the whole test suite (extra arguments go to pytest).
test *args: sync
    uv run --locked pytest {{args}}

# Run a Celery worker with beat, for connected mode (needs REDIS_URL).
worker: sync
    uv run --locked celery -A microapp.celery_app worker -B --loglevel INFO

# A private redis-server on its own port for local connected mode; stop it with Ctrl-C.
redis:
    @echo "Redis on 127.0.0.1:{{redis_port}} — export REDIS_URL=redis://127.0.0.1:{{redis_port}}/0"
    redis-server --port {{redis_port}} --bind 127.0.0.1 --save "" --appendonly no

# Benchmark connected mode (waitress, worker, private Redis, SQLite or DATABASE_URL, wrk); not a test.
bench *args: sync
    uv run --locked python bench/bench.py {{args}}

# Check style: ruff lint and format.
lint: sync
    uv run --locked ruff check .
    uv run --locked ruff format --check .

# Format the code in place.
fmt: sync
    uv run --locked ruff format .
    uv run --locked ruff check --fix .
