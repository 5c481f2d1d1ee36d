"""Runs of the built-in models' trainers in the tests, whole or cut short as a Ctrl-C would cut them: a plain
module (no tests) that test_shapes_sd3.py and test_shapes_finetune.py share, with their one-thread fixture."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread for the whole module (its module-scoped runs included): tiny matrices are fastest on one,
    and far faster than on two on a busy machine. Imported by a test module, it applies to that module only."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_trainer(trainer, stop_at=None):
    """Run ``trainer`` (anything with ``loss(step)`` and ``run()``) and return it; with ``stop_at``, a
    ``KeyboardInterrupt`` is raised as step ``stop_at``'s loss is asked for, after the steps before it."""
    if stop_at is not None:
        loss = trainer.loss

        def interrupted(step):
            if step == stop_at:
                raise KeyboardInterrupt
            return loss(step)

        trainer.loss = interrupted
    trainer.run()
    return trainer
