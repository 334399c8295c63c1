"""The meter gateway: NEM12 files → ``meter.readings`` (one record per interval per channel, key NMI).

Every file is parsed and validated whole before anything from it is sent (``read_nem12``); a
rejected file publishes nothing and is reported with the reason. Valid files are published in the
event-time order of their first interval (less out-of-order data for the windowing stage), each
one flushed (acknowledged by the broker, idempotent producer) before the next starts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline.codec import Codec
from pipeline.ingest.nem12 import Nem12Error, Nem12File, read_nem12
from pipeline.runtime.kafka import IdempotentProducer


@dataclass
class PublishReport:
    """What a publish run did: files and readings sent, and each rejected file with its error."""

    files_published: int = 0
    readings_published: int = 0
    rejected: list[Nem12Error] = field(default_factory=list)


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Files named directly plus the ``*.zip``/``*.csv`` files of named folders, sorted."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in (".zip", ".csv")))
        else:
            out.append(p)
    return out


def publish_nem12(
    paths: Iterable[Path], producer: IdempotentProducer, codec: Codec, topic: str, progress: bool = True
) -> PublishReport:
    """Validate and publish NEM12 files. Never raises for a bad file: it lands in ``report.rejected``.

    Raises ``KafkaIOError`` if the broker does not acknowledge a file's readings.
    """
    report = PublishReport()
    parsed: list[Nem12File] = []
    for path in expand_paths(paths):
        try:
            parsed.append(read_nem12(path))
        except Nem12Error as exc:
            report.rejected.append(exc)
        except OSError as exc:
            report.rejected.append(Nem12Error(path.name, None, "UNREADABLE", f"cannot read file: {exc}"))
    parsed = [f for f in parsed if f.readings]
    parsed.sort(key=lambda f: (min(r.interval_start for r in f.readings), f.name))
    total = sum(len(f.readings) for f in parsed)
    with tqdm(total=total, unit="reading", disable=not progress, desc="publishing") as bar:
        for f in parsed:
            for reading in f.readings:
                producer.send(topic, reading.nmi.encode(), codec.encode(reading),
                              headers=[("source_file", f.name.encode())])
            producer.flush()
            report.files_published += 1
            report.readings_published += len(f.readings)
            bar.update(len(f.readings))
    return report
