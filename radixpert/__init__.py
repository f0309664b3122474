"""Radixpert Edge."""

import os as _os

# Offline means offline: onnxruntime creates a telemetry store (a device id and queued events
# naming models and providers) under ~/.cache/Microsoft when it is imported, unless this is set
# first. Every radixpert process imports this package before onnxruntime.
_os.environ["ORT_DISABLE_TELEMETRY"] = "1"
