"""``pipeline.invoicing.report.format_invoice``: lines whose usage includes estimated or substituted reads
(E, S, F) are marked, with a footnote, as retailers' bills mark estimated reads (issue 14)."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

from pipeline.invoicing.report import ESTIMATED_NOTE, InvoiceLineSummary, InvoiceSummary, format_invoice

D = Decimal


def line(component: str, kind: str, band: str, amount: str, flags: tuple[str, ...] = (), qty: str = "10") -> \
        InvoiceLineSummary:
    return InvoiceLineSummary(component, kind, band, D(qty), "kWh", D("0.25"), D(amount), 1, quality_flags=flags)


def invoice(*lines: InvoiceLineSummary) -> InvoiceSummary:
    return InvoiceSummary("ACC-1|2005-03-01|AUD", "ACC-1", date(2005, 3, 1), date(2005, 4, 1), "AUD", "OPEN", lines)


def test_lines_with_estimated_or_substituted_reads_are_marked_and_footnoted() -> None:
    text = format_invoice(invoice(
        line("energy", "tou", "peak", "3.40", ("A", "E")),
        line("energy", "tou", "off_peak", "2.00", ("A",)),
        line("energy", "tou", "shoulder", "1.00", ("S",)),
        line("feed_in", "feed_in", "", "-0.50", ("F",)),
        line("supply", "fixed_daily", "", "29.06"),
        line("gst", "tax", "", "3.55"),
    ))
    rows = {r.split()[0] + (" " + r.split()[1] if r.split()[1].startswith("(") else ""): r for r in text.splitlines()
            if r.startswith("    ") and not r.strip().startswith(("CHARGES", "AMOUNT"))}
    assert "energy (peak) *" in rows["energy (peak)"]
    assert "energy (shoulder) *" in rows["energy (shoulder)"]
    assert "feed_in *" in rows["feed_in"]
    assert "*" not in rows["energy (off_peak)"] and "*" not in rows["supply"] and "*" not in rows["gst"]
    assert text.splitlines()[-1] == f"  {ESTIMATED_NOTE}"
    assert ESTIMATED_NOTE.startswith("* includes estimated or substituted meter reads (quality E, S or F)")


def test_an_invoice_of_actual_reads_has_no_marker_and_no_footnote() -> None:
    text = format_invoice(invoice(line("energy", "per_unit", "", "3.40", ("A",)),
                                  line("supply", "fixed_daily", "", "9")))
    assert "*" not in text and ESTIMATED_NOTE not in text
    # N (null) and V are not estimates
    assert "*" not in format_invoice(invoice(line("energy", "per_unit", "", "0.00", ("N",))))


def test_manual_lines_of_a_bill_are_shown_netted_and_counted_in_the_total() -> None:
    manual = InvoiceLineSummary("manual", "MANUAL", "", D(1), "item", D("0.10"), D("10.35"), 3, line_kind="MANUAL")
    text = format_invoice(InvoiceSummary("bill:B-1", "ACC-1", date(2025, 12, 1), date(2026, 1, 1), "AUD", "OPEN",
                                         (line("supply", "fixed_daily", "", "1.00"), manual)))
    rows = text.splitlines()
    assert rows[-2].split() == ["manual", "charges", "and", "credits", "(3", "lines)", "10.35", "AUD"]
    assert rows[-1].split() == ["CHARGES", "THIS", "PERIOD", "11.35", "AUD"]
