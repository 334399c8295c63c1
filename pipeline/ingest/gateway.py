"""The meter gateway: NEM12 and NEM13 files → ``meter.readings`` (one record per interval per channel,
key NMI; NEM13 register reads as daily readings spread over the read period, see ``nem13``).

Every file is parsed and validated whole before anything from it is sent (``read_nem12`` /
``read_nem13``); a rejected file publishes nothing and is reported with the reason. Valid files
are published in the event-time order of their first interval (less out-of-order data for the
windowing stage), each one flushed (acknowledged by the broker, idempotent producer) before the
next starts. After a file's readings come its completion markers (``SeriesComplete``, SPEC §3):
one per meter channel in the file, "complete through" the end of its last interval, so windowing
closes those windows at once instead of waiting for later data or the idle timeout. A marker never
makes later data unbillable.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from tqdm import tqdm

from pipeline.codec import Codec
from pipeline.config import Settings
from pipeline.ingest.nem12 import Nem12Error, Nem12File, WindowMinutes, read_nem12
from pipeline.ingest.nem13 import Nem13Error, Nem13File, read_nem13
from pipeline.records import MeterReading, SeriesComplete
from pipeline.runtime.kafka import IdempotentProducer


@dataclass
class PublishReport:
    """What a publish run did: files and readings sent, and each rejected file with its error."""

    files_published: int = 0
    readings_published: int = 0
    markers_published: int = 0
    rejected: list[Nem12Error | Nem13Error] = field(default_factory=list)


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Files named directly plus the ``*.zip``/``*.csv`` files of named folders, sorted."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in (".zip", ".csv")))
        else:
            out.append(p)
    return out


def channel_windows(settings: Settings) -> WindowMinutes:
    """NMI suffix → minutes of the windows the windowing stage sums its readings in (the channel letter's
    metric: ``PIPELINE_WINDOW_MINUTES_ENERGY`` or its ``PIPELINE_METRIC_POLICIES`` override); ``None`` for a
    channel ingest does not bill. What ``read_nem12`` checks interval lengths against."""
    from pipeline.ingest.processor import CHANNEL_METRICS
    from pipeline.windowing.processor import policies_from_settings

    policy = policies_from_settings(settings)

    def minutes(suffix: str) -> int | None:
        metric = CHANNEL_METRICS.get(suffix[:1].upper())
        return None if metric is None else policy(metric).size_ms // 60_000

    return minutes


def publish_nem12(
    paths: Iterable[Path], producer: IdempotentProducer, codec: Codec, topic: str, progress: bool = True,
    window_minutes: WindowMinutes | None = None,
) -> PublishReport:
    """Validate and publish NEM12 files. Never raises for a bad file: it lands in ``report.rejected``.
    ``window_minutes`` (``channel_windows(settings)``): a file with a channel whose interval length does not
    divide its windows is rejected (``INTERVAL_DOES_NOT_FIT_WINDOW``) rather than mis-windowed.

    Raises ``KafkaIOError`` if the broker does not acknowledge a file's readings.
    """
    return _publish(paths, partial(read_nem12, window_minutes=window_minutes), Nem12Error, producer, codec, topic,
                    progress)


def publish_nem13(
    paths: Iterable[Path], producer: IdempotentProducer, codec: Codec, topic: str, progress: bool = True
) -> PublishReport:
    """Validate NEM13 files and publish their register reads as daily readings (``nem13.read_nem13``).

    Same contract as ``publish_nem12``: a bad file lands in ``report.rejected`` and publishes nothing;
    raises ``KafkaIOError`` if the broker does not acknowledge a file's readings.
    """
    return _publish(paths, read_nem13, Nem13Error, producer, codec, topic, progress)


def completion_markers(name: str, readings: Iterable[MeterReading]) -> list[SeriesComplete]:
    """The completion markers of a delivery ``name``: per (NMI, suffix) of ``readings``, complete through
    the end of its last interval (UTC), in (NMI, suffix) order (SPEC §3)."""
    through: dict[tuple[str, str], MeterReading] = {}
    for r in readings:
        held = through.get((r.nmi, r.suffix))
        if held is None or r.interval_end > held.interval_end:
            through[(r.nmi, r.suffix)] = r
    return [SeriesComplete(nmi, suffix, r.interval_end, name) for (nmi, suffix), r in sorted(through.items())]


def _publish(paths, read, error, producer, codec, topic, progress) -> PublishReport:
    """Read every file with ``read`` (rejections, ``error`` instances, into the report), then publish."""
    report = PublishReport()
    parsed: list[Nem12File | Nem13File] = []
    for path in expand_paths(paths):
        try:
            parsed.append(read(path))
        except error as exc:
            report.rejected.append(exc)
        except OSError as exc:
            report.rejected.append(error(path.name, None, "UNREADABLE", f"cannot read file: {exc}"))
    parsed = [f for f in parsed if f.readings]
    parsed.sort(key=lambda f: (min(r.interval_start for r in f.readings), f.name))
    total = sum(len(f.readings) for f in parsed)
    with tqdm(total=total, unit="reading", disable=not progress, desc="publishing") as bar:
        for f in parsed:
            headers = [("source_file", f.name.encode())]
            for reading in f.readings:
                producer.send(topic, reading.nmi.encode(), codec.encode(reading), headers=headers)
            markers = completion_markers(f.name, f.readings)
            for marker in markers:  # after the readings, in their partitions (key NMI): they come after them
                producer.send(topic, marker.nmi.encode(), codec.encode(marker), headers=headers)
            producer.flush()
            report.markers_published += len(markers)
            report.files_published += 1
            report.readings_published += len(f.readings)
            bar.update(len(f.readings))
    return report
