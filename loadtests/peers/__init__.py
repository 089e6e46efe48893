"""Peer servers (MLServer, PyTriton) serving the same ONNX model, for loadtests/peers/compare.py."""
