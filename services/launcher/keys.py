"""The cluster key of a launched cluster: the one the cluster file or environment names,
or, for a local cluster with none, a fresh one in the run folder (0600, made once and
reused by later runs from the same folder). The launcher installs it for its own sockets
(readiness, admin) and hands its children the key file's path in the environment, never
the key itself and never on a command line."""

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
    path = Path(cfg.key_file) if cfg.key_file else Path(cfg.run_dir) / KEY_FILE_NAME
    if not cfg.key_file and not path.exists():
        security.write_key_file(path)
    security.install(security.read_key_file(path))
    return {"MEMSERVE_CLUSTER__KEY_FILE": str(path.resolve())}
