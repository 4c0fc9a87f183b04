import torch

# The suite's models are tiny: one thread avoids the cost of splitting small matmuls across cores.
torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """With -n auto --dist worksteal on two cores, xdist hands each worker a contiguous half of the collection and
    steals from the end of a queue: the demo test (the suite's critical path) opens the first half and compare.py's,
    the next longest, the second, so the two start at once and the short tests fill in around them."""
    first = [item for item in items if "test_a_shrunken_demo" in item.nodeid]
    second = [item for item in items if item.nodeid.startswith("tests/test_compare.py")]
    rest = [item for item in items if item not in first and item not in second]
    half = len(items) // 2 - len(first)
    items[:] = first + rest[:half] + second + rest[half:]
