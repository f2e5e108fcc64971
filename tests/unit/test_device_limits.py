"""The bounds a device puts on what a model asks of it."""

from __future__ import annotations

from edgefl.device.limits import bound_config, with_budget
from edgefl.wire import TrainConfig


def test_epochs_are_capped_and_batches_raised_to_the_devices_bounds() -> None:
    asked = TrainConfig(epochs=100, batch_size=1, lr=0.2, accum=2)
    used = bound_config(asked, max_epochs=20, min_batch_size=8)
    assert (used.epochs, used.batch_size) == (20, 8)
    assert used.model_dump(exclude={"epochs", "batch_size"}) == asked.model_dump(
        exclude={"epochs", "batch_size"}
    )


def test_a_config_within_the_bounds_is_returned_as_is() -> None:
    asked = TrainConfig(epochs=3, batch_size=32)
    assert bound_config(asked, max_epochs=20, min_batch_size=8) is asked


def test_the_budget_stops_at_its_time_or_with_the_stop_flag() -> None:
    now = [100.0]
    stop = [False]
    should_stop = with_budget(lambda: stop[0], 5.0, clock=lambda: now[0])
    now[0] = 104.9
    assert not should_stop()
    now[0] = 105.0
    assert should_stop()
    again = with_budget(lambda: stop[0], 5.0, clock=lambda: now[0])
    stop[0] = True
    assert again()
