import pytest

from helpers import save_random_checkpoint


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A folder holding a checkpoint of fractalmar_tiny_in16 (3 classes, guiding pixel) with random weights."""
    return save_random_checkpoint(str(tmp_path_factory.mktemp("trained")))
