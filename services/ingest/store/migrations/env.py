from services.ingest.store.tables import metadata
from shared.db.migrations import run_env

run_env(metadata)
