import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return ROOT / "models"


@pytest.fixture(scope="session", autouse=True)
def _session_version_state(tmp_path_factory):
    """Module- and session-scoped fixtures run before any per-test fixture: they get a version
    state of their own too, never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("P2U_STATE_DIR", str(tmp_path_factory.mktemp("p2u-state-shared")))
        yield


@pytest.fixture(autouse=True)
def _version_state(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own version state (rollback protection, p2u_onnx.trust), so no test
    reads or writes the user's ~/.local/state/p2u, and no test sees another's versions."""
    d = tmp_path_factory.mktemp("p2u-state")
    monkeypatch.setenv("P2U_STATE_DIR", str(d))
    return d
