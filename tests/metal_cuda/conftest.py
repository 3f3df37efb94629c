def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (an NVIDIA GPU); skipped elsewhere")
