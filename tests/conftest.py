"""Shared test settings."""

import pytest
import torch

from trainables.engines import ENGINE_ENV


@pytest.fixture(scope="session", autouse=True)
def jsb_cache(tmp_path_factory):
    """One ``$PYROSWEEP_CACHE`` for the whole session, set before any test runs: the full
    jsb corpus takes ~30 s to parse from music21, so it is parsed once, by whichever test
    loads it first, and every later load reads the cached ``.npz`` -- in this process,
    in Ray workers started after it and in subprocesses given ``os.environ`` (``pyrosweep
    sweep``/``demo`` drivers). Tests of the cache itself set a directory of their own."""
    directory = tmp_path_factory.mktemp("jsb-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYROSWEEP_CACHE", str(directory))
        yield directory


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The test models are tiny: one intra-op thread is as fast, and it cannot stall in
    OpenMP barriers when other processes (Ray workers) load the cores (seen: 10-30x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["compiled", "torch", "scan"])
def engine(request, monkeypatch):
    """A test on every path of the engine (``trainables.inference``): the compiled CPU
    recursions, the sequential PyTorch reference and the parallel scan."""
    monkeypatch.setenv(ENGINE_ENV, request.param)
    return request.param
