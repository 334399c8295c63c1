"""``pipeline usage show ACCOUNT [--json]`` and ``pipeline usage budget set|list`` (issue 17)."""

from __future__ import annotations

import json
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Annotated

import typer

from pipeline.config import get_settings

usage_app = typer.Typer(help="The real-time usage read model (`pipeline run usage`): snapshots and budgets.",
                        no_args_is_help=True)
budget_app = typer.Typer(help="Budget per account and billing period (alerts on usage.alerts).", no_args_is_help=True)
usage_app.add_typer(budget_app, name="budget")


@usage_app.command("show")
def show(account: Annotated[str, typer.Argument(help="account id")],
         as_of: Annotated[str | None, typer.Option("--as-of", help="local date YYYY-MM-DD; default: latest")] = None,
         as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Usage and cost so far, projections, daily series and TOU bands of an account's billing period.
    Exit 1 when there is no snapshot."""
    from pipeline.usage.query import describe, snapshot

    s = snapshot(get_settings(), account, date.fromisoformat(as_of) if as_of else None)
    if s is None:
        typer.echo(f"no usage snapshot for {account}", err=True)
        raise typer.Exit(1)
    typer.echo(json.dumps(s.to_json(), indent=2) if as_json else "\n".join(describe(s)))


@budget_app.command("set")
def budget_set(account: Annotated[str, typer.Argument(help="account id")],
               amount: Annotated[str, typer.Argument(help="budget per billing period, currency units, e.g. 120.00")],
               currency: Annotated[str, typer.Option("--currency", help="ISO 4217 code")] = "AUD") -> None:
    """Set or replace an account's budget (exit 2 on an invalid amount)."""
    from pipeline.runtime import postgres
    from pipeline.usage.store import set_budget

    try:
        value = Decimal(amount)
        if not value.is_finite() or value <= 0:
            raise InvalidOperation
    except InvalidOperation:
        typer.echo(f"error: amount must be a positive decimal, got {amount!r}", err=True)
        raise typer.Exit(2) from None
    if len(currency) != 3 or not currency.isalpha():
        typer.echo(f"error: currency must be an ISO 4217 code, got {currency!r}", err=True)
        raise typer.Exit(2)
    postgres.with_reconnect(get_settings().database_url, lambda c: set_budget(c, account, value, currency.upper()),
                            give_up_s=60)
    typer.echo(f"budget of {account}: {value} {currency.upper()} per billing period")


@budget_app.command("list")
def budget_list() -> None:
    """Every budget: account, amount per billing period, currency."""
    from pipeline.runtime import postgres
    from pipeline.usage.store import read_budgets

    for account, (amount, cur) in postgres.with_reconnect(get_settings().database_url, read_budgets,
                                                           give_up_s=60).items():
        typer.echo(f"{account}\t{amount}\t{cur}")
