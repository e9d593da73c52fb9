"""The configs of sweeper (Hydra config groups), shipped in the package as ``sweeper.conf``."""
