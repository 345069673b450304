"""A Hypothesis state machine interleaving every money operation, with the invariants
checked after each step: the books balance, the wallet matches a model kept in Python, and
available credit never goes negative except by a clawback."""

from __future__ import annotations

import itertools
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import transaction
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from billing.models import Account, Reservation
from billing.money import Price, usage_cost_usd
from billing.selectors import ledger_violations
from billing.services import (
    InsufficientCredit,
    credit_clawback,
    credit_grant,
    credit_reserve,
    reservation_void,
    reservations_sweep,
    usage_settle,
)
from tests.billing.test_ledger import metered
from tests.factories import make_key, make_org

# One token of input costs exactly 1e-6 USD, so a settle can draw any cost up to its hold.
PRICE = Price(input_per_mtok_usd=Decimal(1), output_per_mtok_usd=Decimal(0))
AMOUNTS = st.decimals(min_value=Decimal("0.000001"), max_value=Decimal(5), places=6)
_request_ids = (f"req_prop_{n}" for n in itertools.count())


class SimulatedCrash(Exception):
    pass


class WalletMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.org = make_org(credit_usd=None)
        self.key, _ = make_key(self.org)
        self.balance = Decimal(0)  # what the wallet must hold, by this model's arithmetic
        self.held: dict[str, Decimal] = {}
        self.resolved: list[str] = []
        self.recorded: set[str] = set()  # requests with a usage record (charged once)
        self.clawed_back = False
        self.has_wallet = False  # created by the first grant or clawback

    def _settle(self, request_id: str, input_tokens: int) -> Decimal:
        """Settle and return what the model expects it to charge: nothing if already recorded."""
        first = request_id not in self.recorded
        usage_settle(
            metered=metered(
                self.key.pk,
                self.org.pk,
                request_id=request_id,
                input_tokens=input_tokens,
                output_tokens=0,
                price=PRICE,
            )
        )
        self.recorded.add(request_id)
        cost = usage_cost_usd(price=PRICE, input_tokens=input_tokens, output_tokens=0)
        return cost if first else Decimal(0)

    @rule(amount=AMOUNTS)
    def top_up(self, amount: Decimal) -> None:
        credit_grant(organization=self.org, amount_usd=amount, reason="top-up")
        self.balance += amount
        self.has_wallet = True

    @rule(amount=AMOUNTS)
    def refund(self, amount: Decimal) -> None:
        credit_clawback(organization=self.org, amount_usd=amount, reason="refund")
        self.balance -= amount
        self.clawed_back = True
        self.has_wallet = True

    @rule(amount=st.decimals(min_value=0, max_value=5, places=6))
    def reserve(self, amount: Decimal) -> None:
        request_id = next(_request_ids)
        fits = self.has_wallet and self.balance - sum(self.held.values()) >= amount
        try:
            credit_reserve(
                request_id=request_id,
                organization_id=self.org.pk,
                api_key_id=self.key.pk,
                amount_usd=amount,
            )
        except InsufficientCredit:
            assert not fits
        else:
            assert fits
            self.held[request_id] = amount

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(sorted(self.held)))
        ceiling = int(self.held.pop(request_id) * 1_000_000)
        self.balance -= self._settle(request_id, data.draw(st.integers(0, ceiling)))
        self.resolved.append(request_id)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def void(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(sorted(self.held)))
        assert reservation_void(request_id=request_id)
        del self.held[request_id]
        self.resolved.append(request_id)

    @precondition(lambda self: self.resolved)
    @rule(data=st.data())
    def resolve_again(self, data: st.DataObject) -> None:
        """A late void changes nothing; a retried settle changes nothing, and a settle that
        arrives after its hold was voided (swept) is still charged: the usage happened."""
        request_id = data.draw(st.sampled_from(self.resolved))
        assert not reservation_void(request_id=request_id)
        self.balance -= self._settle(request_id, 1)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def crash_during_settle(self, data: st.DataObject) -> None:
        """The process dies inside settlement: its transaction rolls back, the hold stays."""
        request_id = data.draw(st.sampled_from(sorted(self.held)))
        recorded = set(self.recorded)
        with pytest.raises(SimulatedCrash), transaction.atomic():
            self._settle(request_id, 0)
            raise SimulatedCrash
        self.recorded = recorded

    @rule()
    def sweep_after_crash(self) -> None:
        """Every process died; once past the bound, the sweeper voids every hold."""
        Reservation.objects.filter(organization=self.org, state=Reservation.State.HELD).update(
            created_at="2000-01-01T00:00Z"
        )
        assert reservations_sweep(older_than=timedelta(minutes=15)) >= len(self.held)
        self.resolved += list(self.held)
        self.held.clear()

    @invariant()
    def books_balance(self) -> None:
        assert ledger_violations(held_longer_than=timedelta(days=365 * 100)) == []

    @invariant()
    def wallet_matches_the_model(self) -> None:
        wallet = Account.objects.filter(organization=self.org, kind=Account.Kind.WALLET).first()
        balance = wallet.balance_usd if wallet else Decimal(0)
        reserved = wallet.reserved_usd if wallet else Decimal(0)
        assert balance == self.balance
        assert reserved == sum(self.held.values())
        if not self.clawed_back:
            assert balance - reserved >= 0


@pytest.mark.django_db
def test_money_operations_in_any_order_keep_every_invariant():
    run_state_machine_as_test(
        WalletMachine,
        settings=settings(max_examples=30, stateful_step_count=25, deadline=None),
    )
