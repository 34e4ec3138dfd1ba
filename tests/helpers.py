"""Helpers shared by the tests."""

from dtokd.train import loop


def interrupt_after(monkeypatch, epochs: int) -> None:
    """Make the trainer raise KeyboardInterrupt (as Ctrl-C does) when it starts epoch ``epochs + 1``:
    the first ``epochs`` epochs run and are checkpointed."""
    real, calls = loop._train_epoch, {"n": 0}

    def interrupted(*args, **kwargs):
        if calls["n"] == epochs:
            raise KeyboardInterrupt("interrupted by the test")
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_epoch", interrupted)
