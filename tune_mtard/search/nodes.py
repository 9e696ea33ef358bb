"""Every node of the Ray cluster sees the search's storage, checked before the first trial (docs/cluster.md,
"Every node is checked first").

Ray Tune's trials write their checkpoints and records to ``search.storage`` from whatever node runs them. A
node that does not mount the storage folder (or cannot reach the object store) fails each trial placed on
it, Ray retries the trial elsewhere, and the search ends looking healthy on half a cluster. So the driver
writes a marker file to the storage and runs one small task on each node a trial could be placed on, which
must read the marker back through its own filesystem of the storage (its own endpoint and credentials); a
node that cannot is named in one line (exit 2) and nothing is started.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from tune_mtard.errors import ConfigError
from tune_mtard.search.compat import trial_nodes
from tune_mtard.search.storage_fs import open_storage

MARKER = ".tune_mtard-node-check-{}"
TASK_TIMEOUT_S = 120.0


def _read_marker(storage: str, options: Mapping[str, Any], marker: str, token: str) -> str:
    """Run on one node: '' when the marker holds ``token``, else why not."""
    try:
        found = open_storage(storage, options).read_text(marker)
    except ConfigError as exc:
        return exc.message
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or str(exc).splitlines()[0]}"
    return "" if found == token else "it holds another file at that path"


def _answer(ref) -> str:
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:  # the node could not even run the task
        return f"the check task failed ({type(exc).__name__})"


def check_nodes_see_storage(storage: str, cpu: float, gpu: float, options: Mapping[str, Any] | None = None) -> None:
    """ConfigError naming ``search.storage`` and each node of the cluster that cannot read a marker the driver
    wrote to ``storage`` (a folder or a URI, ``options`` as in :func:`~tune_mtard.search.storage_fs.open_storage`);
    the marker (and the storage folder, if this made it) is removed either way."""
    import ray  # the search stack: only a search on a cluster loads it
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options = dict(options or {})
    folder = open_storage(storage, options)
    created = folder.is_local and not folder.exists()  # an object store has no folders to leave behind
    token = secrets.token_hex(16)
    marker = MARKER.format(token[:8])
    try:
        folder.write_text(marker, token)
    except OSError as exc:
        raise ConfigError("search.storage", f"{storage}: the driver cannot write there "
                                            f"({str(exc).splitlines()[0]})") from None
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(_read_marker)
        pending = {read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
                   .remote(storage, options, marker, token): described
                   for node_id, described in trial_nodes(cpu, gpu)}
        done, late = ray.wait(list(pending), num_returns=len(pending), timeout=TASK_TIMEOUT_S)
        problems = {pending[ref]: _answer(ref) for ref in done}
        for ref in late:
            ray.cancel(ref, force=True)
            problems[pending[ref]] = f"no answer in {TASK_TIMEOUT_S:.0f} s"
    finally:
        folder.delete(marker)
        if created:
            folder.delete_dir()
    failing = {node: why for node, why in problems.items() if why}
    if failing:
        named = "; ".join(f"node {node}: {why}" for node, why in sorted(failing.items()))
        raise ConfigError("search.storage", f"{len(failing)} of {len(problems)} Ray nodes cannot read {storage} "
                                            f"({named}); every node must reach it: a folder mounted at the same "
                                            "path, an object store with the same endpoint and credentials")
