import pytest

from ._util import new_seed


@pytest.fixture
def seed() -> int:
    """A fresh random seed per test, printed (shown by pytest on failure) for reproduction."""
    s = new_seed()
    print(f"[ops] seed={s}  (reproduce: CLSGEN_TEST_SEED={s})")
    return s
