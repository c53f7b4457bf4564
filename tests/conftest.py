import os
import time

import torch

# Without a GPU every Triton kernel runs on the CPU through the interpreter; it must be switched on
# before triton is first imported (importing torch does not import triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Under pytest-xdist on a machine with several GPUs, the workers take the GPUs in turn ("cuda"
# then means the worker's own device).
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if _worker.startswith("gw") and torch.cuda.is_available():
    torch.cuda.set_device(int(_worker[2:]) % torch.cuda.device_count())


def pytest_configure(config):
    # pytest-xdist's mark (a no-op without it): tests of one group run on one worker
    config.addinivalue_line("markers", "xdist_group(name): run on one pytest-xdist worker")


def pytest_collection_modifyitems(items):
    """Under pytest-xdist the grouped tests (the tensor-parallel spawn, minutes on GPUs) go first,
    so their worker starts on them while the others share out the rest."""
    if _worker:
        items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With ZOO_PROGRESS_LOG set, each test's start and end (with its seconds, setup and teardown
    included) are appended to that file where it runs: a run cut short shows which tests were
    still running and which took longest."""
    path = os.environ.get("ZOO_PROGRESS_LOG")
    if not path:
        yield
        return
    worker = _worker or "main"
    with open(path, "a") as log:
        log.write(f"start {worker} {item.nodeid}\n")
    start = time.perf_counter()
    yield
    with open(path, "a") as log:
        log.write(f"end {worker} {time.perf_counter() - start:.1f} {item.nodeid}\n")


def pytest_runtest_logreport(report):
    """With ZOO_FAILURE_LOG set, each failure's report is appended to that file as it happens, so
    a run cut short by a time limit keeps what failed and why (the summary comes only at the end)."""
    path = os.environ.get("ZOO_FAILURE_LOG")
    if path and report.failed and not hasattr(report, "node"):  # once, where the test ran
        with open(path, "a") as log:
            log.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def kernel_options():
    """set_kernel_options for one test: the options before it are put back after it."""
    import kernels.utils

    previous = dict(kernels.utils.KERNEL_OPTIONS)
    yield kernels.utils.set_kernel_options
    kernels.utils.set_kernel_options(**previous)


@pytest.fixture(autouse=True)
def _fresh_plans_around_monkeypatching(request):
    """Launch plans fix a signature's kernel, config and split for good; a test that
    monkeypatches may change those (split-K, the autotuner's configs, the PDL switch). Around such
    a test the plans are dropped, so no other test runs a plan made under its patches (and it runs
    none made before them)."""
    patched = "monkeypatch" in request.fixturenames
    if patched:
        from kernels.launch import clear_plans

        clear_plans()
    yield
    if patched:
        clear_plans()
