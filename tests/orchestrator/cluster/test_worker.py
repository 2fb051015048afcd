"""The fold worker's exception reaches the driver as its cause, even when it cannot be pickled."""

import pickle
import threading

from orchestrator.cluster.errors import root_cause
from orchestrator.cluster.worker import FoldError, sendable


class KernelError(Exception):
    """Like torch inductor's errors: it holds an object that cannot be pickled."""

    def __init__(self, msg):
        super().__init__(msg)
        self.kernel = threading.Lock()


def _raised(exc):
    def compile_layer():
        raise exc
    try:
        compile_layer()
    except Exception as e:  # noqa: BLE001
        return e


def test_a_picklable_exception_is_sent_as_it_is():
    e = _raised(ValueError("bad row 7"))
    assert sendable(e) is e


def test_an_unpicklable_exception_is_sent_as_text_with_its_cause_and_traceback():
    e = _raised(KernelError("tiling failed for s0*4096"))
    sent = sendable(e)
    back = pickle.loads(pickle.dumps(sent))
    assert isinstance(back, FoldError)
    assert root_cause(str(back)).endswith("KernelError: tiling failed for s0*4096")
    assert "in compile_layer" in str(back)  # the worker's traceback goes with it
