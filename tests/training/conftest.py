import pytest

from jaxft.testing import tiny_hf_model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return tiny_hf_model(tmp_path_factory.mktemp("llama"), "llama3_rope")
