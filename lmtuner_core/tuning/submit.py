"""Checks a sweep and records it as one job of kind 'sweep' (see sweep.py) on the local launcher: its driver is a
process of this machine, queued for its CPU or GPUs like a training job. With a cluster (config.ray) the driver
still runs here, holding one CPU slot, and its trials go to the cluster."""

from __future__ import annotations

import json
from typing import Any

from lmtuner_core.config import TrainConfig
from lmtuner_core.errors import LmtunerError, shown
from lmtuner_core.jobs.launcher import LOCAL
from lmtuner_core.jobs.local_launcher import preflight, resolve_devices
from lmtuner_core.jobs.service import JobService, check_config, new_job_id
from lmtuner_core.jobs.store import JobRecord
from lmtuner_core.tuning.sweep import SWEEP_FILE, TRIALS_DIR, check_sweep


def submit_sweep(
    service: JobService,
    config: TrainConfig,
    *,
    search: dict[str, Any] | None,
    trials: int,
    budget_minutes: float,
    metric: str,
    dry_run: bool = False,
) -> tuple[JobRecord | None, TrainConfig, dict[str, Any], list[str]]:
    """Checks everything a trial would need (paths, every data row, the space against TrainConfig) and, unless
    dry_run, records the sweep and starts its driver when its devices are free. Returns the record, the centre as
    the trials see it, the checked sweep (space, budget) and warnings."""
    spec = check_sweep(config, search, trials, budget_minutes, metric)
    if config.ray is not None:
        if config.ray.address.startswith(("http://", "https://")):
            raise LmtunerError(
                f"ray.address: {shown(config.ray.address)} is a dashboard; a sweep's driver joins the cluster as a Ray "
                "driver: give its Ray Client address 'ray://HOST:10001', or 'auto' on a machine of the cluster",
                field="ray.address",
            )
        # the allow-list of clusters and a local storage_path, checked before any connection
        config = service.launchers.for_config(config).confine(config)
    job_id = new_job_id()
    run = service.run_dir(job_id)
    checked, warnings = check_config(config, service.roots, run, dry_run=dry_run)
    devices = "cpu"  # a cluster's driver: it trains nothing here
    if checked.ray is None:
        devices = resolve_devices(checked.devices)
        warnings += preflight(checked, devices, refuse=False)
    spec["cluster"] = checked.ray.address if checked.ray is not None else None
    spec["devices"] = devices
    if dry_run:
        return None, checked, spec, warnings
    try:
        run.root.mkdir(parents=True)
        run.config.write_text(checked.to_json(), encoding="utf-8")
        (run.root / SWEEP_FILE).write_text(json.dumps(spec, indent=1), encoding="utf-8")
    except OSError as exc:
        raise LmtunerError(f"cannot write the run folder {run.root}: {exc.strerror}; free disk space") from None
    service.store.create(
        job_id=job_id, run_dir=run.root, model=checked.model, method=checked.method,
        output_dir=run.root / TRIALS_DIR, devices=devices, backend=LOCAL, kind="sweep",
    )  # fmt: skip
    service.schedule()
    return service.store.get(job_id), checked, spec, warnings
