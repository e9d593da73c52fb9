"""``python -m sweeper.rerun RUN_ID``: train a logged trial again with its exact configuration.

The trial's resolved config is read back from its MLflow run (artifact ``config.yaml``), so
the re-run does not depend on today's defaults in ``conf/``. The new run is logged in the
same experiment, tagged ``rerun_of=RUN_ID``; a warning says so when the code version (sweeper
version, git commit or uncommitted changes) differs from the one the original ran with. On CPU with
``trainer.deterministic=true`` the validation accuracy is reproduced exactly.

Extra ``key=value`` arguments override the logged config (e.g. ``trainer.device=cuda``).
The MLflow store is ``--tracking-uri``, else the project's ``tracking.uri``
(``$MLFLOW_TRACKING_URI``, else the ``mlflow.db`` of ``conf/paths``, which follows
``$SWEEPER_OUTPUTS``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sweeper.errors import UserError, entry_point

log = logging.getLogger("sweeper.rerun")


def default_uri() -> str:
    """The tracking store a trial logs to by default: ``tracking.uri`` of ``conf/``."""
    from sweeper.config import compose

    return str(compose().tracking.uri)


def logged_config(run_id: str, tracking_uri: str,
                  paths: DictConfig | None = None) -> tuple[DictConfig, Any]:
    """The resolved config a trial ran with, and its MLflow run. ``paths``: where folders the
    trial's config does not name go (default: ``conf/paths``; pass them inside a Hydra app,
    where composing ``conf/`` is not possible)."""
    from mlflow.exceptions import MlflowException

    from sweeper.tracking import download_artifact, is_trial, open_store

    client = open_store(tracking_uri, "--tracking-uri")
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"No MLflow run {run_id} in {tracking_uri}. Copy the run id from the "
                        "MLflow UI, and pass --tracking-uri if the store is elsewhere.") from None
    if not is_trial(run):
        raise UserError(f"Run {run_id} ({run.info.run_name}) is not a trial: pass a trial's run "
                        "id (in the MLflow UI, a study's trials are the runs nested under its "
                        "parent run).")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = download_artifact(client, run_id, "config.yaml", tmp)
        except (MlflowException, OSError):
            raise UserError(f"Run {run_id} has no config.yaml artifact: it is not a sweeper "
                            "trial (or its artifacts were deleted).") from None
        logged = OmegaConf.load(path)
    # A folder conf/paths names but the trial's config does not (it ran before the folder was
    # named there): where conf/paths puts it, below the trial's outputs.
    if paths is None:
        from sweeper.config import compose

        paths = compose().paths
    return OmegaConf.merge({"paths": paths}, logged), run


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """``key=value`` changes to a logged config: a key it does not have is refused (named, with
    the setting it most likely means), so that a typo is not trained as if it were the change;
    ``+key=value`` adds a key of one's own, as in Hydra."""
    from sweeper.validate import near_miss

    plain = []
    for override in overrides:
        key, eq, _ = override.partition("=")
        if not eq:
            raise UserError(f"Could not apply the override {override!r}: use key=value "
                            "(e.g. trainer.device=cuda), or +key=value to add a key.")
        if key.startswith("+"):
            plain.append(override[1:])
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig) or leaf not in node:
            meant = near_miss(leaf, list(node)) if isinstance(node, DictConfig) else None
            hint = f" (did you mean {parent + '.' if parent else ''}{meant}?)" if meant else ""
            raise UserError(f"{key} is not in the run's config{hint}: nothing would read it. "
                            f"Change a key the run has, or add one of your own with +{override}.")
        plain.append(override)
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(plain))
    except Exception as e:  # noqa: BLE001 - a malformed override is the user's to fix
        raise UserError(f"Could not apply overrides {overrides}: {e}") from None


def rerun(run_id: str, tracking_uri: str | None = None, overrides: list[str] | None = None
          ) -> dict[str, Any]:
    """Re-run trial ``run_id`` from its logged config; returns the new trial's results."""
    from sweeper.tracking import code_version
    from sweeper.trial import run_trial

    uri = tracking_uri or default_uri()
    cfg, original = logged_config(run_id, uri)
    cfg.tracking.uri = uri
    cfg.tracking.experiment = original.data.params.get("tracking.experiment",
                                                       cfg.tracking.experiment)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    now = code_version()
    then = {k: original.data.tags.get(k, "unknown") for k in now}
    if then != now or now["git_dirty"] == "true":
        log.warning("Code version differs from the original run: it ran sweeper %s at %s (dirty: "
                    "%s), this is sweeper %s at %s (dirty: %s). Results may differ.",
                    then["version.sweeper"], then["git_commit"][:12], then["git_dirty"],
                    now["version.sweeper"], now["git_commit"][:12], now["git_dirty"])
    result = run_trial(cfg, tags={"rerun_of": run_id})
    before = original.data.metrics.get("val_acc")
    log.info("val_acc: original %s, re-run %.4f%s", before, result["val_acc"],
             "  (identical)" if before == result["val_acc"] else "")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeper.rerun", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_id", help="MLflow run id of the trial to re-run")
    # a default makes argparse treat a "*" positional as optional (without one, calling with
    # no arguments at all says "required: run_id, overrides")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="key=value changes to the logged config (optional)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: tracking.uri of conf/: $MLFLOW_TRACKING_URI, "
                             "else mlflow.db under $SWEEPER_OUTPUTS or outputs/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    rerun(args.run_id, args.tracking_uri, args.overrides)  # a UserError: entry_point reports it
    return 0


if __name__ == "__main__":
    entry_point(lambda: sys.exit(main()))
