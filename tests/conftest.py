"""Suite-wide: detrcore.nn.linear's products on oneDNN alone. In auto mode (the library's default) a shape's first
calls alternate oneDNN and BLAS while timing them, so two runs of the same layer may round differently; tests that
compare paths bit for bit need one backend. tests/ops/test_linear.py covers auto mode itself."""
import pytest


@pytest.fixture(autouse=True)
def _linear_products_on_onednn(monkeypatch):
    from detrcore.nn import onednn_linear

    monkeypatch.setattr(onednn_linear, "BACKEND", "onednn")
