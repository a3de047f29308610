"""``overlaypc.scopes``: ``contextmanager``, ``nullcontext`` and ``suppress`` end every
``with`` block as ``contextlib``'s do (what propagates, what is swallowed, which
traceback an exception keeps, the generator's own steps, misuse), in a differential test."""
from __future__ import annotations

import contextlib
import traceback

import pytest

from overlaypc import scopes

#: how the block ends
BLOCKS = ["ok", "oserror", "keyerror", "stopiteration", "runtimeerror", "baseexception"]
#: what the generator does around its ``yield``
GENERATORS = ["plain", "finally", "catch_all_and_finish", "convert_oserror", "reraise_other",
              "yield_twice", "no_yield", "catch_and_yield_again", "yield_value"]


def _make(deco, kind: str, log: list):
    @deco
    def managed(arg):
        log.append(("enter", arg))
        if kind == "no_yield":
            return
        if kind == "plain":
            yield arg
        elif kind == "yield_value":
            yield {"value": arg}
        elif kind == "finally":
            try:
                yield arg
            finally:
                log.append("finally")
        elif kind == "catch_all_and_finish":
            try:
                yield arg
            except Exception as e:
                log.append(("caught", type(e).__name__))
        elif kind == "convert_oserror":
            try:
                yield arg
            except OSError as e:
                raise ValueError(f"converted {e}") from None
        elif kind == "reraise_other":
            try:
                yield arg
            except Exception:
                raise LookupError("other")
        elif kind == "yield_twice":
            yield arg
            yield arg
        elif kind == "catch_and_yield_again":
            try:
                yield arg
            except Exception:
                yield arg
        log.append("after")
    return managed


def _raise(block: str):
    if block == "oserror":
        raise OSError(2, "gone")
    if block == "keyerror":
        raise KeyError("k")
    if block == "stopiteration":
        raise StopIteration("stop")
    if block == "runtimeerror":
        raise RuntimeError("rt")
    if block == "baseexception":
        raise GeneratorExit()  # a BaseException that is no Exception


def _run(deco, kind: str, block: str):
    """What happens: the log, the value ``with`` got, and the exception that came out
    (type, args, whether it is the block's own, the frames of its traceback, its cause)."""
    log: list = []
    managed = _make(deco, kind, log)
    raised = None
    try:
        with managed(7) as got:
            log.append(("got", got))
            try:
                _raise(block)
            except BaseException as e:
                raised = e
                raise
        log.append("went on")
    except BaseException as out:  # noqa: BLE001 (comparing every ending)
        frames = traceback.extract_tb(out.__traceback__)
        return log, ("raised", type(out).__name__, str(out), out is raised,
                     [frame.name for frame in frames], type(out.__cause__).__name__)
    return log, None


@pytest.mark.parametrize("kind", GENERATORS)
@pytest.mark.parametrize("block", BLOCKS)
def test_contextmanager_ends_blocks_as_contextlib(kind, block):
    assert _run(scopes.contextmanager, kind, block) == _run(contextlib.contextmanager, kind, block)


def test_contextmanager_keeps_the_function_metadata_and_direct_exit_calls():
    def gen(x):
        """Doc."""
        yield x

    ours, theirs = scopes.contextmanager(gen), contextlib.contextmanager(gen)
    assert (ours.__name__, ours.__doc__, ours.__wrapped__) == (theirs.__name__, theirs.__doc__, gen)
    for factory in (ours, theirs):  # an exception type alone, as a direct __exit__ call may pass it
        cm = factory(1)
        assert cm.__enter__() == 1
        assert cm.__exit__(KeyError, None, None) is False   # not swallowed: the caller raises it


@pytest.mark.parametrize("block", BLOCKS)
def test_nullcontext_and_suppress_as_contextlib(block):
    for ours, theirs in ((scopes.nullcontext(5), contextlib.nullcontext(5)),
                         (scopes.nullcontext(), contextlib.nullcontext()),
                         (scopes.suppress(OSError), contextlib.suppress(OSError)),
                         (scopes.suppress(LookupError, RuntimeError), contextlib.suppress(LookupError, RuntimeError)),
                         (scopes.suppress(), contextlib.suppress())):
        outcomes = []
        for cm in (ours, theirs):
            got, out = None, None
            try:
                with cm as got:
                    _raise(block)
            except BaseException as e:  # noqa: BLE001
                out = type(e)
            outcomes.append((got, out))
        assert outcomes[0] == outcomes[1], (ours, block)
