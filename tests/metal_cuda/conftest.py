def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (the lent NVIDIA machine); skipped elsewhere")
