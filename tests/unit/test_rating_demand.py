"""Demand in the rating stage (issue 14), through ``RatingProcessor`` and its state codec: the peak of a
meter's **total** import over its channels per demand interval, whatever order the channels arrive in;
finer windows added up to the tariff's own demand interval; windows that cannot measure it refused;
revisions and re-rating by new − old; block demand rates; and the upgrade of format-1 state."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.codec import SCHEMA_DIR, Codec, default_codec
from pipeline.rating.pricebook import PriceBook
from pipeline.rating.processor import FORMAT, PeriodState, RatedWindowState, RatingProcessor, state_codec
from pipeline.records import DeadLetter, RatedCharge, UsageWindow
from pipeline.reference import ReferenceData
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import DictStore, FakeContext
from tests.unit.test_rating_processor import ACC, CODEC, NMI, TOPICS, TOU_ENERGY, amounts, book, reference, utc

D = Decimal
CENT = D("0.01")


def cents(x: Decimal) -> Decimal:
    return x.quantize(CENT, rounding=ROUND_HALF_UP)


class EncodedStore(DictStore):
    """A store that keeps what the changelog would: every value through the stage's state codec."""

    def __init__(self, codec: Codec = CODEC) -> None:
        super().__init__()
        self.encode, self.decode = state_codec(codec)

    def get(self, key: bytes, default: Any = None) -> Any:
        raw = self.data.get(key)
        return default if raw is None else self.decode(key, raw)

    def put(self, key: bytes, value: Any, cache: bool = True) -> None:
        self.data[key] = self.encode(key, value)

    def scan(self, prefix: bytes) -> Any:
        return iter([(k, self.decode(k, v)) for k, v in sorted(self.data.items()) if k.startswith(prefix)])


class Harness:
    """One rating processor, partition 0, state kept encoded (as restored from the changelog)."""

    def __init__(self, ref: ReferenceData, store: DictStore | None = None) -> None:
        self.ref = ref
        self.processor = RatingProcessor(TOPICS, CODEC, lambda: self.ref)
        self.ctx = FakeContext()
        self.ctx.stores[0] = store or EncodedStore()
        self.offset = 0
        self.processor.on_assign(0, self.ctx)

    def feed(self, *wins: UsageWindow) -> None:
        for w in wins:
            rec = Incoming(TOPICS.usage_windows, 0, self.offset, ACC.encode(), CODEC.encode(w), (), 0)
            self.processor.process(rec, self.ctx)
            self.offset += 1

    def flush(self) -> list[RatedCharge]:
        before = len(self.ctx.forwarded)
        self.processor.punctuate(0, self.ctx)
        return [CODEC.decode(v, RatedCharge) for t, _k, v in self.ctx.forwarded[before:] if t == TOPICS.charges_rated]

    def charges(self) -> list[RatedCharge]:
        return [CODEC.decode(v, RatedCharge) for t, _k, v in self.ctx.forwarded if t == TOPICS.charges_rated]

    def dead_letters(self) -> list[DeadLetter]:
        return [CODEC.decode(v, DeadLetter) for t, _k, v in self.ctx.forwarded if t == TOPICS.dlq_ingest]


def win(start: datetime, value: str | Decimal, suffix: str = "E1", minutes: int = 30, revision: int = 0,
        previous: str | Decimal = "0", quality: str = "A", nmi: str = NMI) -> UsageWindow:
    end = start + timedelta(minutes=minutes)
    value = D(value)
    return UsageWindow(
        window_id=f"{ACC}|{nmi}/{suffix}|{start:%Y-%m-%dT%H:%MZ}", account=ACC, series=f"{nmi}/{suffix}",
        metric="energy_import", unit="kWh", window_start=start, window_end=end, revision=revision,
        timing="ON_TIME" if revision == 0 else "LATE", value=value, delta=value - D(previous), count=1,
        qualities=(quality,), sources=(f"{nmi}.csv#{suffix}{revision}",), watermark=end + timedelta(hours=1),
    )


def demand_book(book_id: str = "DEM", interval: int | None = None, rate: str | None = "10.50",
                blocks: list[dict[str, Any]] | None = None, **demand: Any) -> PriceBook:
    comp: dict[str, Any] = {"id": "demand", "kind": "demand", "metric": "energy_import", **demand}
    if interval is not None:
        comp["interval_minutes"] = interval
    if blocks is not None:
        comp["blocks"] = blocks
    else:
        comp["rate"] = rate
    return book(book_id, [{"id": "energy", "kind": "per_unit", "metric": "energy_import", "rate": "0.10"}, comp])


# --- defect: two channels with one window start overwrote each other ------------------------------------------
# Two half hours of a meter with a general (E1) and a controlled-load (E2) channel on Mon 2024-05-06 (AEST):
# 08:00 E1 3.0 + E2 2.0 = 5.0 kWh; 08:30 E1 4.0 + E2 0.5 = 4.5 kWh. Total-import peak 5.0 kWh in 30 min = 10 kW.
E1E2 = [win(utc(2024, 5, 5, 22, 0), "3.0", "E1"), win(utc(2024, 5, 5, 22, 0), "2.0", "E2"),
        win(utc(2024, 5, 5, 22, 30), "4.0", "E1"), win(utc(2024, 5, 5, 22, 30), "0.5", "E2")]


def test_demand_is_the_peak_of_the_meters_total_import_in_either_channel_order() -> None:
    ref = reference([demand_book()])
    e1_first = Harness(ref)
    e1_first.feed(*[w for w in E1E2 if w.series.endswith("E1")])
    e1_first.flush()
    e1_first.feed(*[w for w in E1E2 if w.series.endswith("E2")])
    e1_first.flush()
    e2_first = Harness(ref)
    e2_first.feed(*[w for w in E1E2 if w.series.endswith("E2")])
    e2_first.flush()
    e2_first.feed(*[w for w in E1E2 if w.series.endswith("E1")])
    e2_first.flush()
    one_batch = Harness(ref)
    one_batch.feed(*E1E2)
    one_batch.flush()
    # by hand: 10 kW × 10.50 = 105.00; energy 9.5 kWh × 0.10 = 0.95
    want = {"DEM|demand|": D("105.00"), "DEM|energy|": D("0.95")}
    for h in (e1_first, e2_first, one_batch):
        assert {k: v for k, v in amounts(h.charges()).items() if k in want} == want
        assert h.charges()[-1].account == ACC
    demand = [c for c in one_batch.charges() if c.component_id == "demand"][-1]
    assert demand.quantity == D("10.000000") and demand.unit == "kW"


def test_revisions_of_one_channel_move_the_total_by_new_minus_old() -> None:
    h = Harness(reference([demand_book()]))
    h.feed(*E1E2)
    h.flush()
    # E2 at 08:00 revised down 2.0 → 0.2: 08:00 total 3.2, 08:30 total 4.5 is now the peak: 9 kW
    h.feed(win(utc(2024, 5, 5, 22, 0), "0.2", "E2", revision=1, previous="2.0"))
    assert amounts(h.flush())["DEM|demand|"] == D("94.50") - D("105.00")
    # and back up above the rest: 08:00 total 3.0 + 3.1 = 6.1 kWh = 12.2 kW
    h.feed(win(utc(2024, 5, 5, 22, 0), "3.1", "E2", revision=2, previous="0.2"))
    h.flush()
    assert amounts(h.charges())["DEM|demand|"] == cents(D("12.2") * D("10.50")) == D("128.10")


def test_demand_is_measured_per_meter_and_an_account_pays_each_meters_peak() -> None:
    other = "NMI0000002"
    h = Harness(reference([demand_book()]))
    h.feed(*E1E2, win(utc(2024, 5, 5, 22, 0), "1.0", "E1", nmi=other))  # the other meter peaks at 2 kW
    h.flush()
    assert amounts(h.charges())["DEM|demand|"] == cents((D(10) + D(2)) * D("10.50")) == D("126.00")


# --- defect: demand resolution was the window size ----------------------------------------------------------------
FIVE_MINUTE = [D(x) for x in ("0.5", "0.9", "0.7", "0.6", "0.1", "0.2")]  # 08:00 .. 08:25, one channel


def five_minute_windows(suffix: str = "E1", values: list[Decimal] = FIVE_MINUTE) -> list[UsageWindow]:
    return [win(utc(2024, 5, 5, 22, 0) + timedelta(minutes=5 * i), v, suffix, minutes=5) for i, v in enumerate(values)]


def test_five_minute_windows_are_added_up_to_the_tariffs_demand_interval() -> None:
    # 15-minute demand: 08:00-08:15 = 2.1 kWh → 8.4 kW; 08:15-08:30 = 0.9 → 3.6 kW
    # 30-minute demand: 3.0 kWh → 6.0 kW; 5-minute demand: 0.9 kWh → 10.8 kW
    for interval, kw in ((15, D("8.4")), (30, D("6.0")), (5, D("10.8")), (10, D("8.4"))):
        h = Harness(reference([demand_book(interval=interval)]))
        h.feed(*five_minute_windows())
        charge = next(c for c in h.flush() if c.component_id == "demand")
        assert (charge.quantity, charge.amount) == (kw.quantize(D("0.000001")), cents(kw * D("10.50"))), interval
    # 10-minute intervals: 08:00-08:10 1.4, 08:10-08:20 1.3, 08:20-08:30 0.3 → 1.4 × 6 = 8.4 kW (as asserted)


def test_five_minute_windows_of_two_channels_are_added_per_interval() -> None:
    h = Harness(reference([demand_book(interval=15)]))
    e2 = [D(x) for x in ("0.0", "0.0", "0.0", "0.9", "0.9", "0.9")]  # controlled load from 08:15
    h.feed(*five_minute_windows("E2", e2))
    h.flush()
    h.feed(*five_minute_windows("E1"))
    h.flush()
    # 08:00-08:15 = 2.1 kWh; 08:15-08:30 = 0.9 + 2.7 = 3.6 kWh → 14.4 kW
    assert amounts(h.charges())["DEM|demand|"] == cents(D("14.4") * D("10.50")) == D("151.20")


def test_a_window_longer_than_the_demand_interval_is_refused_before_it_changes_anything() -> None:
    h = Harness(reference([demand_book(interval=15)]))
    h.feed(win(utc(2024, 5, 5, 22, 0), "3.0", "E1", minutes=30))
    assert h.flush() == []
    (dead,) = h.dead_letters()
    assert dead.reason == "DEMAND_INTERVAL_FINER_THAN_DATA" and dead.stage == "rating"
    assert "a 30-minute window cannot measure demand 'demand' of DEM v1, stated over 15-minute intervals" \
        in dead.message
    assert h.ctx.store(0).data == {} or set(h.ctx.store(0).data) == {b"books"}
    # a window that does not divide the interval (20 minutes into 30) is refused as well
    h2 = Harness(reference([demand_book(interval=30)]))
    h2.feed(win(utc(2024, 5, 5, 22, 0), "3.0", "E1", minutes=20))
    assert [d.reason for d in h2.dead_letters()] == ["DEMAND_INTERVAL_FINER_THAN_DATA"]


# --- block demand ----------------------------------------------------------------------------------------------
BLOCKS = [{"up_to": "10", "rate": "12.00"}, {"up_to": None, "rate": "8.00"}]


def test_block_demand_through_the_stage() -> None:
    h = Harness(reference([demand_book(blocks=BLOCKS)]))
    h.feed(win(utc(2024, 5, 5, 22, 0), "7.25", "E1"), win(utc(2024, 5, 5, 22, 0), "1.00", "E2"))
    got = {f"{c.component_id}|{c.band}": (c.quantity, c.period_total)
           for c in h.flush() if c.component_kind == "demand"}
    # 8.25 kWh in 30 min = 16.5 kW: block 1 10 kW × 12.00 = 120.00; block 2 6.5 kW × 8.00 = 52.00
    assert got == {"demand|block 1": (D("10.000000"), D("120.00")), "demand|block 2": (D("6.500000"), D("52.00"))}


# --- re-rating under a new version, and the explanation ---------------------------------------------------------
def test_a_new_version_with_another_interval_re_rates_the_demand_from_the_stored_windows() -> None:
    v1 = demand_book(interval=30)
    h = Harness(reference([v1]))
    h.feed(*five_minute_windows())
    h.flush()
    v2 = PriceBook.model_validate({**json.loads(v1.canonical_json()), "version": 2})
    v2 = PriceBook.model_validate({**v2.model_dump(mode="json"), "components": [
        v2.model_dump(mode="json")["components"][0],
        {**v2.model_dump(mode="json")["components"][1], "interval_minutes": 15}]})
    h.ref = reference([v1, v2])
    lines = h.flush()
    assert [(c.component_id, c.amount, c.cause.startswith("pricebook:")) for c in lines if c.component_id == "demand"] \
        == [("demand", cents(D("8.4") * D("10.50")) - cents(D("6.0") * D("10.50")), True)]
    assert amounts(h.charges())["DEM|demand|"] == D("88.20")


def test_the_demand_line_names_the_windows_of_both_channels_and_their_flags() -> None:
    h = Harness(reference([demand_book()]))
    h.feed(E1E2[0], win(utc(2024, 5, 5, 22, 0), "2.0", "E2", quality="E"))
    demand = next(c for c in h.flush() if c.component_id == "demand")
    exp = json.loads(demand.explanation)
    assert sorted(w["window_id"].split("|")[1] for w in exp["windows"]) == [f"{NMI}/E1", f"{NMI}/E2"]
    assert exp["quality_flags"] == ["A", "E"]
    # the actual read replaces the estimate: the flags follow (and the amount, 2.0 → 2.5 kWh)
    h.feed(win(utc(2024, 5, 5, 22, 0), "2.5", "E2", revision=1, previous="2.0", quality="A"))
    demand = next(c for c in h.flush() if c.component_id == "demand")
    assert json.loads(demand.explanation)["quality_flags"] == ["A"]


# --- property: any order, batching and revisions of two channels bill the final total-import peak --------------
slot = st.tuples(st.sampled_from(["E1", "E2"]), st.integers(0, 11))  # channel, 5-minute slot of one hour
values = st.integers(0, 9_999).map(lambda i: D(i).scaleb(-3))


@st.composite
def arrivals(draw: st.DrawFn) -> tuple[list[UsageWindow], list[bool], dict[tuple[str, int], Decimal]]:
    chosen = draw(st.lists(slot, min_size=1, max_size=10, unique=True))
    revisions, final = [], {}
    for channel, i in chosen:
        start = utc(2024, 5, 5, 22, 0) + timedelta(minutes=5 * i)
        vals = draw(st.lists(values, min_size=1, max_size=3))
        prev = D(0)
        for rev, v in enumerate(vals):
            revisions.append(win(start, v, channel, minutes=5, revision=rev, previous=prev))
            prev = v
        final[(channel, i)] = vals[-1]
    sequence = draw(st.permutations(revisions))
    cuts = draw(st.lists(st.booleans(), min_size=len(sequence), max_size=len(sequence)))
    return list(sequence), cuts, final


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrivals())
def test_any_order_of_channels_and_revisions_bills_the_final_total_import_peak(case: Any) -> None:
    sequence, cuts, final = case
    h = Harness(reference([demand_book(interval=15, blocks=BLOCKS)]))
    for w, cut in zip(sequence, cuts, strict=True):
        h.feed(w)
        if cut:
            h.flush()
    h.flush()
    per_interval: dict[int, Decimal] = defaultdict(Decimal)
    for (_channel, i), v in final.items():
        per_interval[i // 3] += v
    kw = max(max(per_interval.values()) * 4, D(0))
    want = {"DEM|demand|block 1": cents(min(kw, D(10)) * D(12)),
            "DEM|demand|block 2": cents(max(kw - 10, D(0)) * D(8))}
    got = amounts(h.charges())
    assert {k: got.get(k, D(0)) for k in want} == want
    assert all(c.amount != 0 for c in h.charges())


# --- upgrade from state format 1 -------------------------------------------------------------------------------
def format1_codec(tmp_path: Path) -> Codec:
    """The codec of the code before issue 14: today's schemas with the rating state schemas of format 1."""
    out = tmp_path / "schemas"
    shutil.copytree(SCHEMA_DIR, out)
    (out / "history" / "RatingPeriodState.v1.avsc").replace(out / "rating_period_state.avsc")
    return Codec(out)


def format1_store(tmp_path: Path) -> EncodedStore:
    """The store of a period rated before issue 14: E1 3.0 and E2 2.0 kWh at 08:00; E2 (the last to arrive)
    overwrote E1's demand at that start, so 4 kW (42.00) was billed instead of 10 kW."""
    old = format1_codec(tmp_path)
    enc_old, _ = state_codec(old)
    store = EncodedStore()
    pkey = f"rp|{ACC}|2024-05-01"
    demand_key, energy_key = "DEM|1|demand|", "DEM|1|energy|"
    for w in E1E2[:2]:
        start_ms = int(w.window_start.timestamp() * 1000)
        rw = RatedWindowState(0, w.value, pkey, [energy_key], [demand_key], start_ms, w.value * 2, "energy_import",
                              start_ms + 1_800_000, ["A"])
        raw = enc_old(b"rw|" + w.window_id.encode(), rw)
        assert old.record_name(raw) == "RatedWindowState"
        store.data[b"rw|" + w.window_id.encode()] = raw
    ps = PeriodState(ACC, utc(2024, 5, 1).date(), utc(2024, 6, 1).date(), {energy_key: D("5.0")}, {energy_key: ["A"]},
                     {energy_key: 2}, {"DEM|energy|": D("0.50"), "DEM|demand|": D("42.00")},
                     {demand_key: {str(int(E1E2[0].window_start.timestamp() * 1000)): D("4.0")}})
    store.data[pkey.encode()] = enc_old(pkey.encode(), ps)
    restored = store.get(pkey.encode())
    assert restored.format == 1 and restored.demand and not restored.demand_kwh  # read through the v1 schema
    assert default_codec().record_name(store.data[pkey.encode()]) == "RatingPeriodState"
    store.put(b"books", ["DEM:1"])
    return store


def test_format_1_state_is_read_and_its_collided_demand_rebuilt_from_the_windows(tmp_path: Path) -> None:
    """... when the next revision reaches the period; the difference is emitted as an ordinary delta."""
    store = format1_store(tmp_path)
    pkey, demand_key, energy_key = f"rp|{ACC}|2024-05-01", "DEM|1|demand|", "DEM|1|energy|"
    h = Harness(reference([demand_book()]), store)
    h.feed(*E1E2[2:])  # 08:30: E1 4.0 + E2 0.5
    lines = h.flush()
    assert amounts(lines) == {"DEM|demand|": D("105.00") - D("42.00"), "DEM|energy|": D("0.45")}
    upgraded = store.get(pkey.encode())
    assert upgraded.format == FORMAT and upgraded.demand == {} and upgraded.qualities == {}
    assert upgraded.quality_counts == {energy_key: {"A": 4}, demand_key: {"A": 4}}


def test_format_1_state_is_rebuilt_by_re_rating_under_a_new_version(tmp_path: Path) -> None:
    store = format1_store(tmp_path)
    v1 = demand_book()
    v2 = PriceBook.model_validate({**json.loads(v1.canonical_json()), "version": 2})
    h = Harness(reference([v1, v2]), store)
    lines = h.flush()
    # same rates: only the corrected demand (10 kW under v2's key) replaces the 4 kW billed
    assert amounts(lines) == {"DEM|demand|": D("105.00") - D("42.00")}
    assert all(c.cause == "pricebook:DEM:v2" for c in lines)
    upgraded = store.get(f"rp|{ACC}|2024-05-01".encode())
    assert upgraded.format == FORMAT and set(upgraded.demand_kwh) == {"DEM|1|demand|", "DEM|2|demand|"}


# --- accumulation reads have no time of day ----------------------------------------------------------------------
def test_nem13_day_readings_are_refused_by_time_of_use_and_demand_and_billed_by_flat_rates() -> None:
    """A NEM13 read spread over days lands whole in the first window of each NEM day: priced by time of use
    it would all fall in the midnight band, and as demand it would be a day's kWh in half an hour."""
    spread = replace(win(utc(2024, 5, 5, 14, 0), "5.9", "E11"),
                     sources=("NEM13 accumulation 06858->07462 = 604 kWh spread evenly over 102 days: f.csv#4",))
    for priced_by in ([TOU_ENERGY], [{"id": "energy", "kind": "per_unit", "metric": "energy_import", "rate": "0.1"},
                                     {"id": "demand", "kind": "demand", "metric": "energy_import", "rate": "1"}]):
        h = Harness(reference([book("TIMED", priced_by)]))
        h.feed(spread)
        assert h.flush() == []
        (dead,) = h.dead_letters()
        assert dead.reason == "ACCUMULATION_ON_INTERVAL_TARIFF"
        assert "NEM13 register reads spread evenly over days" in dead.message and "flat or tiered plan" in dead.message
    flat = Harness(reference([book("FLAT", [{"id": "energy", "kind": "per_unit", "metric": "energy_import",
                                              "rate": "0.10"}])]))
    flat.feed(spread)
    assert amounts(flat.flush()) == {"FLAT|energy|": D("0.59")} and flat.dead_letters() == []


# --- tiers inside TOU through the stage ----------------------------------------------------------------------------
def test_tiers_inside_tou_through_the_stage_follow_revisions_and_name_their_windows() -> None:
    """First 10 kWh of the month: peak 0.30, off-peak 0.15; above: peak 0.36, off-peak 0.18 (graduated)."""
    tiered = book("TT", [{
        "id": "energy", "kind": "tou", "metric": "energy_import", "default_band": "off_peak",
        "bands": [{"band": "peak", "times": [{"day_types": ["weekday"], "start": "14:00", "end": "20:00"}]},
                  {"band": "off_peak"}],
        "tiers": [{"up_to": "10", "rates": {"peak": "0.30", "off_peak": "0.15"}},
                  {"up_to": None, "rates": {"peak": "0.36", "off_peak": "0.18"}}]}])
    h = Harness(reference([tiered], [("TT", utc(2024, 1, 1).date(), None)]))
    peak, off = utc(2024, 5, 6, 5, 0), utc(2024, 5, 6, 1, 0)  # Mon 15:00 and 11:00 AEST
    h.feed(win(peak, "4"), win(off, "12"))
    h.flush()
    # 16 kWh: tier 1 10, tier 2 6; peak is 1/4: 2.5 + 1.5, off-peak 7.5 + 4.5
    # 2.5 × 0.30 = 0.75; 1.5 × 0.36 = 0.54; 7.5 × 0.15 = 1.125 → 1.13; 4.5 × 0.18 = 0.81
    assert amounts(h.charges()) == {"TT|energy|peak, tier 1": D("0.75"), "TT|energy|peak, tier 2": D("0.54"),
                                    "TT|energy|off_peak, tier 1": D("1.13"), "TT|energy|off_peak, tier 2": D("0.81")}
    # the peak window is revised 4 → 8: 20 kWh, peak 2/5: 4 + 4, off-peak 6 + 6 — every line moves
    h.feed(win(peak, "8", revision=1, previous="4"))
    moved = h.flush()
    assert {f"{c.component_id}|{c.band}" for c in moved} == {
        "energy|peak, tier 1", "energy|peak, tier 2", "energy|off_peak, tier 1", "energy|off_peak, tier 2"}
    assert amounts(h.charges()) == {"TT|energy|peak, tier 1": D("1.20"), "TT|energy|peak, tier 2": D("1.44"),
                                    "TT|energy|off_peak, tier 1": D("0.90"), "TT|energy|off_peak, tier 2": D("1.08")}
    off_line = next(c for c in moved if c.band == "off_peak, tier 1")
    # the off-peak line moved because of the peak window: its explanation names it
    windows = [w["window_id"] for w in json.loads(off_line.explanation)["windows"]]
    assert windows == [f"{ACC}|{NMI}/E1|2024-05-06T05:00Z"]
