"""Helpers shared by several test modules."""

import importlib
import importlib.util

import pytest


def import_or_skip(name: str):
    # Not pytest.importorskip: a torchvision wheel built for another torch (CUDA wheel with a +cpu torch) breaks
    # the import of torch_fidelity with a RuntimeError ("operator torchvision::nms does not exist"), not an ImportError.
    # torch_fidelity imports torchvision in its __init__; when that fails, the submodules imported before stay in
    # sys.modules and a second import "succeeds", so torchvision goes first to make the skip independent of test order.
    names = ("torchvision", name) if importlib.util.find_spec("torch_fidelity") else (name,)
    try:
        return [importlib.import_module(n) for n in names][-1]
    except (ImportError, RuntimeError, OSError) as e:
        pytest.skip(f"{name} unavailable: {type(e).__name__}: {e}")


def cli_ok(*args):
    """Run the reflow CLI in-process with these arguments (stringified) and check it exits 0."""
    from reflow.cli.app import app
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


def free_port() -> str:
    """A TCP port free right now, for torchrun's --master_port (a fixed one collides with any other run)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
