"""PyTorch -> ONNX export tooling and the example model zoo.

torch is imported only inside this package (and only where it is needed);
the serving process under ``server/`` never imports it.
"""
