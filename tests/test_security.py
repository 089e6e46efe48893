"""Security on a real server: TLS and mutual TLS (certificates made by the test with the openssl CLI),
bearer tokens (UNAUTHENTICATED / PERMISSION_DENIED; health, reflection and metrics stay open), only
model files are ever loaded (nothing unpickled), and the metrics port binds where it is told."""

from __future__ import annotations

import json
import pickle
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import REPO_ROOT, require_tool
from onnx_models import scale_model, write_config
from server.cli import build_parser
from server.protocol import grpc_service_pb2 as pb
from server.protocol import grpc_service_pb2_grpc as pb_grpc
from test_cli import kiln_env
from test_repository import make_scale, x_input

USER, ADMIN = "user-token-0123456789", "admin-token-9876543210"


# ---- certificates ------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate (EC P-256: fast)."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=kiln test CA", cwd=d)
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=kiln {name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    # a second, unrelated CA and client: a certificate the server must not trust
    _openssl("req", "-x509", *ec, "-keyout", "rogue.key", "-out", "rogue.crt", "-days", "2", "-subj", "/CN=rogue", cwd=d)
    return d


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    make_scale(root, "s", {1: 2.0})
    make_scale(root, "t", {1: 3.0})
    return root


def infer_ok(client, **kwargs) -> None:
    x, inp = x_input()
    result = client.infer("s", [inp], **kwargs)
    np.testing.assert_allclose(result.as_numpy("y"), 2 * x, rtol=1e-6)


def status_of(call) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status()


# ---- TLS ---------------------------------------------------------------------------------------


def test_tls(pki, repo, start_server):
    server = start_server(repo, tls_cert=pki / "server.crt", tls_key=pki / "server.key")
    with triton.InferenceServerClient(server.url, ssl=True, root_certificates=str(pki / "ca.crt")) as client:
        infer_ok(client)
    # a plaintext client cannot talk to the TLS port
    with triton.InferenceServerClient(server.url) as plain:
        assert status_of(lambda: plain.is_server_live(client_timeout=3)) in (
            "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
    # nor a client that does not trust the server's CA
    with triton.InferenceServerClient(server.url, ssl=True, root_certificates=str(pki / "rogue.crt")) as wrong:
        assert status_of(lambda: wrong.is_server_live(client_timeout=3)) in (
            "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")


def test_mutual_tls(pki, repo, start_server):
    server = start_server(repo, tls_cert=pki / "server.crt", tls_key=pki / "server.key", tls_client_ca=pki / "ca.crt")
    ca = str(pki / "ca.crt")
    with triton.InferenceServerClient(server.url, ssl=True, root_certificates=ca, private_key=str(pki / "client.key"),
                                      certificate_chain=str(pki / "client.crt")) as client:
        infer_ok(client)
    with triton.InferenceServerClient(server.url, ssl=True, root_certificates=ca) as anonymous:  # no client certificate
        assert status_of(lambda: anonymous.is_server_live(client_timeout=3)) in (
            "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
    with triton.InferenceServerClient(server.url, ssl=True, root_certificates=ca, private_key=str(pki / "rogue.key"),
                                      certificate_chain=str(pki / "rogue.crt")) as rogue:  # not signed by the CA
        assert status_of(lambda: rogue.is_server_live(client_timeout=3)) in (
            "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")


# ---- bearer tokens -----------------------------------------------------------------------------


@pytest.fixture
def token_files(tmp_path) -> tuple[Path, Path]:
    users = tmp_path / "tokens"
    users.write_text(f"# inference clients\n{USER}\n\nsecond-user-token\n")
    admins = tmp_path / "admin-tokens"
    admins.write_text(f"{ADMIN}\n")
    return users, admins


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_tokens(repo, start_server, token_files):
    users, admins = token_files
    server = start_server(repo, control_mode="explicit", load_models=("s",), auth_token_file=users,
                          admin_token_file=admins)
    with triton.InferenceServerClient(server.url) as client:
        # inference: no token, a wrong one, a malformed header -> UNAUTHENTICATED
        for headers in ({}, bearer("wrong"), bearer(USER + "x"), {"authorization": USER}, bearer("")):
            assert status_of(lambda: infer_ok(client, headers=headers)) == "StatusCode.UNAUTHENTICATED", headers
            assert status_of(lambda: client.get_model_metadata("s", headers=headers)) == "StatusCode.UNAUTHENTICATED"
        infer_ok(client, headers=bearer(USER))
        infer_ok(client, headers={"authorization": "bearer second-user-token"})
        infer_ok(client, headers=bearer(ADMIN))  # an admin token is a valid token too
        # the repository index stays readable with a normal token
        index = client.get_model_repository_index(headers=bearer(USER))
        assert {m.name for m in index.models} == {"s", "t"}
        # load / unload: admin only
        for action in (client.load_model, client.unload_model):
            assert status_of(lambda: action("t", headers=bearer(USER))) == "StatusCode.PERMISSION_DENIED"
            assert status_of(lambda: action("t")) == "StatusCode.UNAUTHENTICATED"
            assert status_of(lambda: action("t", headers=bearer("nope"))) == "StatusCode.UNAUTHENTICATED"
        assert not client.is_model_ready("t", headers=bearer(USER))
        client.load_model("t", headers=bearer(ADMIN))
        assert client.is_model_ready("t", headers=bearer(USER))
        client.unload_model("t", headers=bearer(ADMIN))
        assert not client.is_model_ready("t", headers=bearer(USER))

    channel = grpc.insecure_channel(server.url)
    try:
        # probes: health and reflection need no token
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                    timeout=5))
        assert "inference.GRPCInferenceService" in {s.name for s in answer.list_services_response.service}
        # streams: refused without a token, served with one
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="s")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ModelStreamInfer(iter([request]), timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = list(stub.ModelStreamInfer(iter([request]), metadata=(("authorization", f"Bearer {USER}"),),
                                             timeout=5))
        assert answers[0].error_message == "" and answers[0].infer_response.model_name == "s"
        # a raw call with a wrong token, as an attacker would send it
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
        with pytest.raises(grpc.RpcError) as info:
            live(b"", metadata=(("authorization", "Bearer " + "A" * 4096),), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert USER not in info.value.details() and "Bearer <token>" in info.value.details()
    finally:
        channel.close()
    # metrics stay reachable
    assert "kiln_requests_total" in urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()


def test_no_admin_file_means_nobody_loads(repo, start_server, token_files):
    users, _ = token_files
    server = start_server(repo, control_mode="explicit", load_models=("s",), auth_token_file=users)
    with triton.InferenceServerClient(server.url) as client:
        infer_ok(client, headers=bearer(USER))
        with pytest.raises(InferenceServerException) as info:
            client.load_model("t", headers=bearer(USER))
        assert info.value.status() == "StatusCode.PERMISSION_DENIED"
        assert "--admin-token-file" in info.value.message()


def test_admin_file_alone_protects_only_load_and_unload(repo, start_server, token_files):
    _, admins = token_files
    server = start_server(repo, control_mode="explicit", load_models=("s",), admin_token_file=admins)
    with triton.InferenceServerClient(server.url) as client:
        infer_ok(client)  # inference stays open
        assert status_of(lambda: client.load_model("t")) == "StatusCode.UNAUTHENTICATED"
        client.load_model("t", headers=bearer(ADMIN))
        assert client.is_model_ready("t")


def test_load_refused_outside_explicit_mode_even_for_admins(repo, start_server, token_files):
    users, admins = token_files
    server = start_server(repo, auth_token_file=users, admin_token_file=admins)
    with triton.InferenceServerClient(server.url) as client:
        assert status_of(lambda: client.load_model("t", headers=bearer(ADMIN))) == "StatusCode.FAILED_PRECONDITION"


def test_serve_flags(tmp_path, repo, pki, token_files):
    """The flags reach the server: a `kiln serve` subprocess with TLS and tokens, and clear errors for bad files."""
    users, admins = token_files
    args = build_parser().parse_args(["serve", "--tls-cert", "c", "--tls-key", "k", "--tls-client-ca", "ca",
                                      "--auth-token-file", "t", "--admin-token-file", "a"])
    assert (args.tls_cert, args.tls_key, args.tls_client_ca) == (Path("c"), Path("k"), Path("ca"))
    assert (args.auth_token_file, args.admin_token_file) == (Path("t"), Path("a"))
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    for bad, message in ((["--auth-token-file", str(empty)], "no token"),
                         (["--tls-cert", str(pki / "server.crt")], "--tls-key"),
                         (["--tls-client-ca", str(pki / "ca.crt")], "--tls-cert"),
                         (["--admin-token-file", str(tmp_path / "missing")], "missing")):
        done = subprocess.run([sys.executable, "-m", "server", "serve", "--model-repository", str(repo), *bad],
                              env=kiln_env(), capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
        assert done.returncode == 2 and message in done.stderr, (bad, done.returncode, done.stderr)


# ---- only model files are loaded ---------------------------------------------------------------


class _Trap:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_are_never_loaded(tmp_path, start_server):
    repo = tmp_path / "repo"
    marker = tmp_path / "UNPICKLED"
    trap = pickle.dumps(_Trap(marker))
    config = 'name: "{n}"\n{extra}max_batch_size: 8\n' \
             'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]\n' \
             'output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
    cases = {
        "only_pkl": ("", {"model.pkl": trap}),  # no config, no model file of a known platform
        "only_pt": ("", {"model.pt": trap, "model.pth": trap}),
        "pkl_as_default": ('platform: "onnxruntime_onnx"\ndefault_model_filename: "model.pkl"\n', {"model.pkl": trap}),
        "pt_for_aoti": ('backend: "torch_aoti"\ndefault_model_filename: "model.pt"\n', {"model.pt": trap}),
        "path_escape": ('platform: "onnxruntime_onnx"\ndefault_model_filename: "../../s/1/model.onnx"\n', {}),
        "pickle_named_onnx": ('platform: "onnxruntime_onnx"\n', {"model.onnx": trap}),
        "pytorch_platform": ('platform: "pytorch_libtorch"\n', {"model.pt": trap}),
    }
    for name, (extra, files) in cases.items():
        write_config(repo / name, config.replace("{n}", name).replace("{extra}", extra)) if extra else None
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        for filename, data in files.items():
            (repo / name / "1" / filename).write_bytes(data)
    scale_model(repo / "s" / "1" / "model.onnx", 2.0, [4])
    server = start_server(repo, strict_readiness=False)
    with triton.InferenceServerClient(server.url) as client:
        infer_ok(client)
        index = {m.name: m for m in client.get_model_repository_index().models}
        for name in cases:
            assert not client.is_model_ready(name), name
            assert index[name].state == "UNAVAILABLE" and index[name].reason, (name, index[name])
        assert "'.onnx'" in index["pkl_as_default"].reason
        assert "'.pt2'" in index["pt_for_aoti"].reason
        assert "without a path" in index["path_escape"].reason
    assert not marker.exists(), "a pickle was unpickled"


# ---- the metrics address -----------------------------------------------------------------------


def _connects(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) == 0


def test_metrics_port_binds_where_told(repo, start_server):
    if not _connects_possible("127.0.0.2"):
        pytest.skip("127.0.0.2 is not a loopback address here")
    server = start_server(repo, metrics_host="127.0.0.2")
    port = server.server.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5).read().decode()
    assert "kiln_model_ready" in text
    assert not _connects("127.0.0.1", port), "the metrics port also listens on the gRPC host"
    assert _connects("127.0.0.1", server.server.grpc_port) and not _connects("127.0.0.2", server.server.grpc_port)


def _connects_possible(host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, 0))
        except OSError:
            return False
    return True


def test_client_commands_speak_tls_and_tokens(pki, repo, start_server, token_files, tmp_path, capsys):
    """`kiln infer` and `kiln models` reach a server that wants mutual TLS and a bearer token."""
    from server.cli import main

    users, admins = token_files
    server = start_server(repo, tls_cert=pki / "server.crt", tls_key=pki / "server.key", tls_client_ca=pki / "ca.crt",
                          auth_token_file=users, admin_token_file=admins)
    token = tmp_path / "my-token"
    token.write_text(USER + "\n")
    connection = ["--url", server.url, "--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / "client.crt"),
                  "--tls-key", str(pki / "client.key")]
    assert main(["models", *connection, "--token-file", str(token)]) == 0
    assert "READY" in capsys.readouterr().out
    assert main(["infer", "s", *connection, "--token-file", str(token)]) == 0
    assert "model s version 1" in capsys.readouterr().out
    assert main(["infer", "s", *connection]) == 1  # no token
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_load_tools_speak_tls_and_tokens(pki, repo, start_server, token_files, tmp_path):
    """`kiln bench` and the locust user load a server that wants mutual TLS and a bearer token; the
    bench report says what was in use but never holds the token or the key."""
    from test_bench import _kiln
    from test_locust import _run_locust

    users, admins = token_files
    server = start_server(repo, tls_cert=pki / "server.crt", tls_key=pki / "server.key", tls_client_ca=pki / "ca.crt",
                          auth_token_file=users, admin_token_file=admins)
    token = tmp_path / "my-token"
    token.write_text(USER + "\n")
    tls = ["--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / "client.crt"), "--tls-key", str(pki / "client.key")]
    bench = ["bench", "s", "--url", server.url, "--concurrency", "2", "--duration", "0.5", "--warmup", "0.1", "--no-progress"]

    # two client processes: the TLS material and token travel into each (pickled)
    proc = _kiln(*bench, *tls, "--token-file", str(token), "--processes", "2", "--json", str(tmp_path / "report.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (tmp_path / "report.json").read_text()
    assert USER not in text and "PRIVATE KEY" not in text
    report = json.loads(text)
    assert report["config"]["security"] == {"tls": True, "client_certificate": True, "token": True}
    step = report["steps"][0]
    assert step["ok"] > 0 and step["errors"] == {} and step["client"]["processes"] == 2
    assert step["server"]["success_count"] > 0  # ModelStatistics carried the token too
    streamed = _kiln(*bench, *tls, "--token-file", str(token), "--streaming", "--json", str(tmp_path / "streamed.json"))
    assert streamed.returncode == 0, streamed.stdout + streamed.stderr
    step = json.loads((tmp_path / "streamed.json").read_text())["steps"][0]
    assert step["ok"] > 0 and step["errors"] == {}  # every stream opened with the token

    no_token = _kiln(*bench, *tls)
    assert no_token.returncode == 2 and "UNAUTHENTICATED" in no_token.stderr, no_token.stderr
    plaintext = _kiln(*bench)
    assert plaintext.returncode == 2 and "a TLS port (--tls-ca)" in plaintext.stderr, plaintext.stderr
    half_pair = _kiln(*bench, "--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / "client.crt"))
    assert half_pair.returncode == 2 and "--tls-key" in half_pair.stderr, half_pair.stderr

    env = {"KILN_TLS_CA": str(pki / "ca.crt"), "KILN_TLS_CERT": str(pki / "client.crt"),
           "KILN_TLS_KEY": str(pki / "client.key"), "KILN_TOKEN_FILE": str(token)}
    proc, rows = _run_locust(server.url, tmp_path / "locust", "--model", "s", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert int(rows["s"]["Request Count"]) > 20 and int(rows["s"]["Failure Count"]) == 0, rows["s"]
    proc, rows = _run_locust(server.url, tmp_path / "locust-plain", "--model", "s")  # plaintext to a TLS port
    assert int(rows["Aggregated"]["Request Count"]) > 0 and rows["Aggregated"]["Request Count"] == rows["Aggregated"]["Failure Count"]


def test_client_security_from_files(pki, tmp_path):
    from server.channels import ClientSecurity

    assert not ClientSecurity.from_files().tls  # plaintext unless asked
    assert ClientSecurity.from_files(tls=True).tls and ClientSecurity.from_files(tls=True).ca is None  # system CAs
    assert ClientSecurity.from_files(tls_ca=pki / "ca.crt").tls
    # a client certificate means TLS even without --tls-ca (it used to fall back to plaintext)
    mutual = ClientSecurity.from_files(tls_cert=pki / "client.crt", tls_key=pki / "client.key")
    assert mutual.tls and mutual.ca is None and mutual.describe() == {"tls": True, "client_certificate": True, "token": False}
    with pytest.raises(ValueError, match="--tls-key"):
        ClientSecurity.from_files(tls_ca=pki / "ca.crt", tls_cert=pki / "client.crt")
    for content in ("", "two tokens\n"):
        (tmp_path / "t").write_text(content)
        with pytest.raises(ValueError, match="one bearer token"):
            ClientSecurity.from_files(token_file=tmp_path / "t")
    with pytest.raises(OSError):
        ClientSecurity.from_files(tls_ca=tmp_path / "missing.crt")
    (tmp_path / "t").write_text(f"  {USER}\n")
    assert ClientSecurity.from_files(token_file=tmp_path / "t").metadata == (("authorization", f"Bearer {USER}"),)


def test_h2load_speaks_tls_and_tokens(pki, repo, start_server, token_files, tmp_path):
    """loadtests/h2load.py against a TLS + token server: h2load over https with the bearer header, the
    token masked in the recorded command; a wrong token fails every call; no mutual TLS."""
    import dataclasses

    from loadtests import h2load
    from server.channels import ClientSecurity

    require_tool("h2load")
    users, admins = token_files
    server = start_server(repo, tls_cert=pki / "server.crt", tls_key=pki / "server.key", auth_token_file=users,
                          admin_token_file=admins)
    token = tmp_path / "my-token"
    token.write_text(USER + "\n")
    security = ClientSecurity.from_files(tls_ca=pki / "ca.crt", token_file=token)
    workload = h2load.prepare(server.url, "s", tmp_path, security=security)
    assert workload.scheme == "https"
    step = h2load.run_closed_loop(workload, concurrency=2, duration_s=1.0, connections=1, warmup_s=0.2)
    assert step["errors"] == 0 and step["ok"] == step["done"] > 20, step
    assert USER not in step["command"] and "authorization: Bearer ***" in step["command"]

    wrong = h2load.run_closed_loop(dataclasses.replace(workload, token="wrong"), concurrency=2, duration_s=0.5)
    assert wrong["done"] > 0 and wrong["ok"] == 0 and wrong["errors"] == wrong["done"]
    with pytest.raises(grpc.RpcError) as info:  # the probe call without a token
        h2load.prepare(server.url, "s", tmp_path, security=ClientSecurity.from_files(tls_ca=pki / "ca.crt"))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(ValueError, match="client certificate"):
        h2load.prepare(server.url, "s", tmp_path, security=ClientSecurity.from_files(
            tls_ca=pki / "ca.crt", tls_cert=pki / "client.crt", tls_key=pki / "client.key"))


def test_secrets_stay_out_of_reprs(pki, tmp_path):
    from loadtests import h2load
    from server.channels import ClientSecurity

    (tmp_path / "t").write_text(USER)
    security = ClientSecurity.from_files(tls_cert=pki / "client.crt", tls_key=pki / "client.key", token_file=tmp_path / "t")
    assert USER not in repr(security) and "PRIVATE KEY" not in repr(security)
    assert USER not in repr(h2load.Workload("u", "m", tmp_path, 1, "https", USER))
