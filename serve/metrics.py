"""Prometheus metrics of the node: counters of what happened, and the queue read at every scrape."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from radixpert.serve.queue import Queue

# Seconds: from a few milliseconds (a spool write) to many minutes (a queue behind an outage).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    """One registry per node, so that several nodes in one process never share counters."""

    def __init__(self, queue: Queue):
        self.registry = CollectorRegistry()
        self.received = Counter("radixpert_received", "C-STORE requests by outcome (accepted, duplicate, "
                                "ignored by routing, refused: out of resources or unreadable request)",
                                ["outcome"], registry=self.registry)
        self.jobs = Counter("radixpert_jobs_finished", "Jobs finished, by state (done, withheld, failed)",
                            ["state"], registry=self.registry)
        self.deliveries = Counter("radixpert_delivery_attempts", "Delivery attempts by destination and outcome "
                                  "(sent, retrying, dead)", ["destination", "outcome"], registry=self.registry)
        self.stage = Histogram("radixpert_stage_seconds", "Latency per stage: spool (receive to queue), wait "
                               "(queue), read, preprocess, frontend, visual_prefill, decode, checks, report (all model "
                               "stages), sr, delivery (one attempt), end_to_end (C-STORE to delivered)",
                               ["stage"], buckets=BUCKETS, registry=self.registry)
        self.registry.register(_QueueCollector(queue))


class _QueueCollector(Collector):
    """Jobs and deliveries per state, read from the queue at scrape time (true across restarts)."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.queue.counts()
        jobs = GaugeMetricFamily("radixpert_jobs", "Jobs in the queue per state", labels=["state"])
        for state, n in counts["jobs"].items():
            jobs.add_metric([state], n)
        yield jobs
        depth = GaugeMetricFamily("radixpert_queue_depth", "Jobs received or running (what the bound counts)")
        depth.add_metric([], counts["jobs"]["received"] + counts["jobs"]["running"])
        yield depth
        deliveries = GaugeMetricFamily("radixpert_deliveries", "Deliveries per destination and state",
                                       labels=["destination", "state"])
        for key, n in counts["deliveries"].items():
            deliveries.add_metric(key.split("/", 1), n)
        yield deliveries
