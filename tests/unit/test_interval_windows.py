"""Issue 14: a reading is never silently mis-windowed. Windowing puts each reading whole into the window of
its start, so with 5-minute windows a 30-minute reading was billed in one 5-minute window and its demand
(kWh ÷ window hours) came out 6 times too high. The NEM12 gateway now refuses a channel whose interval
length does not divide its windows, naming the channel, both lengths and the setting; real files."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.codec import default_codec
from pipeline.config import MetricPolicy, Settings
from pipeline.ingest.gateway import channel_windows, publish_nem12
from pipeline.ingest.nem12 import REASONS, Nem12Error, read_nem12

DATA = Path(__file__).resolve().parent.parent / "data" / "nem12"
THIRTY = DATA / "NEM12#000000000000001#CNRGYMDP#NEMMCO.zip"  # NEM1201002 E1, E2: 30-minute intervals
FIFTEEN = DATA / "NEM12#mdffl0000000001#ACTEWM#NEMMCO.zip"  # NEM1201001 E1, E2: 15-minute intervals
MIXED = DATA / "NEM12#000000000000005#CNRGYMDP#NEMMCO.zip"  # NEM1205082 E1: 30 then 15-minute intervals


def minutes(w: int):
    return lambda suffix: w


@pytest.mark.parametrize(("path", "window", "refused"), [
    (THIRTY, 5, True), (THIRTY, 15, True), (THIRTY, 30, False), (THIRTY, 60, False),
    (FIFTEEN, 5, True), (FIFTEEN, 15, False), (FIFTEEN, 30, False), (FIFTEEN, 20, True),
    (MIXED, 15, True), (MIXED, 30, False),
], ids=lambda v: v.name.split("#")[1] if isinstance(v, Path) else str(v))
def test_a_channel_whose_intervals_do_not_divide_its_windows_is_refused(path: Path, window: int,
                                                                        refused: bool) -> None:
    if not refused:
        assert read_nem12(path, minutes(window)).readings
        return
    with pytest.raises(Nem12Error) as caught:
        read_nem12(path, minutes(window))
    err = caught.value
    assert err.reason == "INTERVAL_DOES_NOT_FIT_WINDOW" and err.reason in REASONS
    length = 15 if path is FIFTEEN else 30  # MIXED: its 30-minute channel does not fit 15-minute windows
    assert f"has {length}-minute intervals, but its readings would be summed in {window}-minute windows" in err.problem
    assert f"PIPELINE_WINDOW_MINUTES_ENERGY a multiple of {length}" in err.problem and err.line is not None


def test_without_windows_nothing_is_checked() -> None:
    assert len(read_nem12(THIRTY).readings) == len(read_nem12(THIRTY, minutes(30)).readings) == 384


def test_channel_windows_follow_the_settings_per_metric() -> None:
    plain = channel_windows(Settings(window_minutes_energy=5))
    assert [plain(s) for s in ("E1", "e2", "B1", "Q1", "K1", "X1")] == [5, 5, 5, 5, 5, None]
    export = channel_windows(Settings(window_minutes_energy=5,
                                      metric_policies={"energy_export": MetricPolicy(window_minutes=30)}))
    assert (export("E1"), export("B1")) == (5, 30)


class Recorder:
    """The producer's calls, no broker."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    def send(self, topic: str, key: bytes, value: bytes, headers: object = None) -> None:
        self.sent.append((topic, key, value))

    def flush(self) -> None:
        pass


def test_the_gateway_publishes_nothing_from_a_refused_file() -> None:
    producer = Recorder()
    windows = channel_windows(Settings(window_minutes_energy=5))
    report = publish_nem12([THIRTY, FIFTEEN], producer, default_codec(), "meter.readings",  # type: ignore[arg-type]
                           progress=False, window_minutes=windows)
    assert [e.reason for e in report.rejected] == ["INTERVAL_DOES_NOT_FIT_WINDOW"] * 2
    assert report.files_published == 0 and producer.sent == []
    # 15-minute windows take the 15-minute file and still refuse the 30-minute one
    report = publish_nem12([THIRTY, FIFTEEN], producer, default_codec(), "meter.readings",  # type: ignore[arg-type]
                           progress=False, window_minutes=channel_windows(Settings(window_minutes_energy=15)))
    assert [e.file for e in report.rejected] == [read_nem12(THIRTY).readings[0].source_file]  # zip!member
    assert report.files_published == 1 and report.readings_published == len(read_nem12(FIFTEEN).readings)
