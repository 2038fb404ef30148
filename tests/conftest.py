"""Shared fixtures. Session-scoped data fixtures are shared by every test: never mutate them
(deep-copy ``small_raw`` first, as ``small_raw_copy`` does)."""

from __future__ import annotations

import copy
import os
import pickle

import pytest

# the packaged MiniLM loads from disk; never let a test wait for the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# Ray's log handler binds the sys.stderr of the moment Ray is first imported: imported inside a
# test that uses capsys, it would keep writing to that test's (then closed) buffer and every
# later ray.init would print "--- Logging error --- Traceback". Import it once here, under the
# session's capture.
import ray  # noqa: E402,F401

# tests run tiny models on a 2-core CI machine: with several threads each small op pays for
# thread synchronisation (measured: ~1 s instead of ~15 ms for a tiny MAG step under load)
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def small_raw() -> dict:
    """The raw MMSA dict of the small synthetic set (seed 0, encoder-free text features)."""
    from trainables.data.synthetic import make_synthetic

    return make_synthetic("small", seed=0)


@pytest.fixture
def small_raw_copy(small_raw) -> dict:
    """A private deep copy of ``small_raw`` that a test may modify."""
    return copy.deepcopy(small_raw)


@pytest.fixture(scope="session")
def small_pickle(small_raw, tmp_path_factory):
    """``small_raw`` written as an MMSA pickle (a Path ending in .pkl)."""
    path = tmp_path_factory.mktemp("data") / "small.pkl"
    with open(path, "wb") as f:
        pickle.dump(small_raw, f, protocol=pickle.HIGHEST_PROTOCOL)
    return path


@pytest.fixture(scope="session")
def small_data(small_raw):
    """``small_raw`` validated: a MultimodalData (source "synthetic:small")."""
    from trainables.data import arrays_from_mmsa

    return arrays_from_mmsa(small_raw, "synthetic:small")


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts down at the end of the session the Ray that ``ray_local`` started last."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_session):
    """A local 2-CPU Ray (the search reuses an initialised Ray). Started by the first module that
    asks for it and kept for the next ones (CI time: a Ray start, its workers' start and its
    shutdown cost seconds per module); a module that needs a Ray of its own (test_faults_more's
    ``ray_faulty``, test_cluster's cluster) shuts this one down first, and the next module that
    asks for ``ray_local`` starts a new one."""
    import ray

    if not ray.is_initialized():
        # "local": our own Ray, even where `ray start` left a cluster that ray.init() would join
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
