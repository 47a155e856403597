"""The cluster key of a launched cluster: the one the cluster file or environment names;
else the one this process already holds (a bench or test that is itself a member); else,
for a local cluster, a fresh one in the run folder (0600, made once and reused by later
runs from the same folder). The launcher installs it for its own sockets (readiness,
admin) and hands it to its children in the environment (the key file's path, or the
secret the process holds), never on a command line."""

from __future__ import annotations

from pathlib import Path

from common import security
from services.launcher.config import ClusterConfig

KEY_FILE_NAME = "cluster.key"


def prepare_key(cfg: ClusterConfig) -> dict[str, str]:
    """Install the cluster's key in this process; return the variables children need."""
    source = security.ClusterKeyConfig(key_file=cfg.key_file, secret_key=cfg.secret_key)
    if cfg.secret_key:
        # Came from MEMSERVE_CLUSTER__SECRET_KEY, which every child inherits.
        security.install(security.load_key(source))
        return {}
    held = security.installed_key()
    if held is not None and not cfg.key_file:
        return {"MEMSERVE_CLUSTER__SECRET_KEY": held.secret.decode()}
    path = Path(cfg.key_file) if cfg.key_file else Path(cfg.run_dir) / KEY_FILE_NAME
    if not cfg.key_file and not path.exists():
        security.write_key_file(path)
    security.install(security.read_key_file(path))
    return {"MEMSERVE_CLUSTER__KEY_FILE": str(path.resolve())}
