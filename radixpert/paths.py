"""Where Radixpert keeps caches (torch-free)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "RADIXPERT_CACHE"


def cache_dir() -> Path:
    """``$RADIXPERT_CACHE``, else ``$XDG_CACHE_HOME/radixpert``, else ``~/.cache/radixpert``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "radixpert"


# The phantom-trained demo checkpoint shipped inside the package (see train/recipes/demo.sh).
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "demo"
DEMO_WEIGHTS_ENV = "RADIXPERT_DEMO_WEIGHTS"


def demo_checkpoint() -> Path:
    """The weights the default bundle is built from: ``$RADIXPERT_DEMO_WEIGHTS`` (a folder from
    ``radixpert-train pack``, e.g. a site's own default model), else the shipped demo weights."""
    configured = os.environ.get(DEMO_WEIGHTS_ENV)
    return Path(configured).expanduser() if configured else DEMO_CHECKPOINT


def demo_bundle_dir() -> Path:
    """Where ``radixpert-export --demo`` builds the demo bundle and ``radixpert-run`` finds it."""
    return cache_dir() / "bundles" / "demo"
